"""Settings this project needs before Ray is imported, applied when ``dwf_ray.runtime`` is first imported (see
README): no auth token, no usage stats, single-node Ray bound to loopback, Hugging Face offline."""
import os

for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)
