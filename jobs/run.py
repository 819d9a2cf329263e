"""Entry point for `ray job submit`: runs the `dwf` CLI inside the job (stages or the whole run).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/run.py run --preset digits-mlp \
        --root s3://bucket/runs/demo
    ray job submit ... -- python jobs/run.py pca --root s3://bucket/runs/demo

The job joins the cluster it runs on (Ray sets RAY_ADDRESS for job drivers).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dwf_ray.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry()
