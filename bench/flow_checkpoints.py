"""What choosing the flow checkpoint in function space could gain: retrain a finished run's flow (its own config
and latents, in one process) keeping every selectable checkpoint, then sample and evaluate each one through the
pipeline, as its own run root whose zoo, canon and PCA stages are linked from the run's.

    python bench/flow_checkpoints.py RUN_ROOT --out runs/flow-checkpoints [--every 2000]

The flow stage keeps the checkpoint with the lowest held-out latent loss. This bench prints, for every
checkpoint, that loss beside the function-space result of its samples (test accuracy, functional novelty, the
margin over the best baseline with its standard error, at T = 1 and at the best temperature). The best row is
an oracle (chosen on the test split), so it bounds what any function-space choice among one run's checkpoints
can gain over the latent loss. Writes bench/results/flow_checkpoints.json (one entry per run root).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from zoo_scaling import link_stages, root_point

RESULTS = Path(__file__).parent / "results" / "flow_checkpoints.json"


def checkpoint_states(run_root: str, every: int) -> tuple[list[dict], object, int]:
    """([{step, heldout_loss, ema, chosen_by_latent_loss}] of the selectable checkpoints, one every ``every``
    steps and the last, the latent scaler, k)."""
    import torch
    from dwf_ray import store
    from dwf_ray.config import RunConfig
    from dwf_ray.flow.checkpoint import LatentScaler
    from dwf_ray.flow.trainer import train_in_process
    from dwf_ray.pca.model import PCAModel
    torch.set_num_threads(1)          # as the flow stage's Ray Train worker
    cfg = RunConfig.model_validate(store.read_json(store.join(run_root, "config.json"))).flow
    z = PCAModel.load_latents(store.join(run_root, "pca"))
    scaler = LatentScaler.fit(z, cfg.scaling)
    states = []

    def keep(step: int, loss: float, trainer) -> None:
        states.append({"step": step, "heldout_loss": loss,
                       "ema": {k: v.detach().clone() for k, v in trainer.ema.state_dict().items()}})
        print(f"step {step}: held-out loss {loss:.4f}", flush=True)
    _, info = train_in_process(scaler.transform(z).astype("float32"), cfg.model_copy(update={"eval_every": every}),
                               on_eval=keep)
    chosen = info["best_step"]
    for s in states:
        s["chosen_by_latent_loss"] = s["step"] == chosen
    return states, scaler, z.shape[1]


def evaluate_checkpoint(run_root: str, out: str, state: dict, scaler, dim: int) -> dict:
    """Sample and evaluate one checkpoint as run root ``out/step<S>``; its curve point."""
    from dwf_ray import store
    from dwf_ray.config import RunConfig
    from dwf_ray.flow.checkpoint import save_flow
    from dwf_ray.pipeline import Pipeline
    base_cfg = store.read_json(store.join(run_root, "config.json"))
    pipe = Pipeline(os.path.join(out, f"step{state['step']}"), RunConfig.model_validate(base_cfg), quiet=True)
    link_stages(pipe, run_root, base_cfg, before="flow")     # zoo, canon, pca

    def write_flow(cfg, run_store) -> dict:
        info = {"step": state["step"], "heldout_loss": state["heldout_loss"]}
        save_flow(run_store.uri("flow", "model.pt"), state["ema"], cfg.flow, scaler, dim, info)
        return info
    pipe.run_stage("flow", write_flow)
    pipe.run(["sample", "eval"])
    return root_point(pipe.store.root)


def row(state: dict, point: dict) -> dict:
    op, best = point["operating_point"], point["best"]
    return {"step": state["step"], "heldout_loss": state["heldout_loss"],
            "chosen_by_latent_loss": state["chosen_by_latent_loss"],
            "acc": op["acc"], "func_novelty": op["func_novelty"], "margin": op["margin"],
            "margin_se": op["margin_se"], "best": best}


def print_rows(rows: list[dict]) -> None:
    print("| step | held-out latent loss | T=1 acc % | func. novelty | margin (SE) | best setting (margin - 2 SE) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = r["best"]
        best = "-" if b is None else (f"{b['setting']}: {b['acc']:.2f} at {b['func_novelty']:.2f}, "
                                      f"{b['margin']:+.2f} ({b['margin_se']:.2f})")
        mark = " (latent-loss choice)" if r["chosen_by_latent_loss"] else ""
        print(f"| {r['step']:,}{mark} | {r['heldout_loss']:.4f} | {r['acc']:.2f} | {r['func_novelty']:.2f} | "
              f"{r['margin']:+.2f} ({r['margin_se']:.2f}) | {best} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_root", help="a finished run root (its pca stage complete)")
    ap.add_argument("--out", default="runs/flow-checkpoints", help="where each checkpoint's run root goes")
    ap.add_argument("--every", type=int, default=2000, help="keep a checkpoint every this many steps")
    args = ap.parse_args()
    states, scaler, dim = checkpoint_states(args.run_root, args.every)
    rows = [row(s, evaluate_checkpoint(args.run_root, args.out, s, scaler, dim)) for s in states]
    print_rows(rows)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[os.path.abspath(args.run_root)] = rows
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
