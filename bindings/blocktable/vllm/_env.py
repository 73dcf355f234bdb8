"""The plugin's environment switches (read by every module of the plugin;
the package re-exports them)."""
import os

ENV_SEGMENT = "BLOCKTABLE_VLLM"
ENV_STATS = "BLOCKTABLE_VLLM_STATS_DIR"
ENV_CHECK = "BLOCKTABLE_VLLM_CHECK"
ENV_DEV = "BLOCKTABLE_VLLM_DEV"


def enabled():
    """The segment name when the plugin is switched on, else None."""
    return os.environ.get(ENV_SEGMENT) or None
