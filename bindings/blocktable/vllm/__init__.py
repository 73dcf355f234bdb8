"""blocktable.vllm: a vLLM plugin that puts a v1 engine's KV block state in a
blocktable segment.

Enable it by installing blocktable next to vLLM and setting, for every
process of the engine:

    BLOCKTABLE_VLLM=<segment name>     the switch; unset = the plugin does nothing
    BT_SOCKET=<path>                   btd's control socket (default: as bt-ctl finds it)
    BLOCKTABLE_VLLM_STATS_DIR=<dir>    optional: <role>-<pid>.json counters per process
    BLOCKTABLE_VLLM_CHECK=1            optional: workers keep vLLM's own block ids too
                                       and compare them with the gathered rows each step
    BLOCKTABLE_VLLM_DEV=1              development only: without a reachable btd, create /
                                       attach the segment directly (no registration)

vLLM calls register() (entry point group ``vllm.general_plugins``) in every
process: the front end, the EngineCore and each worker. register() checks the
vLLM version and installs the patches (see scheduler.py and worker.py for
each one and why); each takes effect only where its code runs, so the front
end never connects, the EngineCore's scheduler writes the rows (and, with
the cache pools, keeps its BlockPool in the segment), and the workers gather
their block tables from those rows.

Request keys: see keys.py (the scheduler and the workers derive the same).

Errors: register() raises RuntimeError naming the vLLM version found when it
is not one this plugin supports (the engine then fails at start, loudly).
Thread and process safety: register() is idempotent per process.
"""
from ._env import ENV_CHECK, ENV_DEV, ENV_SEGMENT, ENV_STATS, enabled

__all__ = ["register", "SUPPORTED_VLLM", "ENV_SEGMENT", "ENV_STATS", "ENV_CHECK", "enabled"]

# The v1 internals patched here (class names, method signatures, attributes
# read) were checked against these releases only.
SUPPORTED_VLLM = ("0.32",)

_registered = False


def check_version(version=None):
    """RuntimeError unless `version` (default: the installed vLLM's) is a
    supported release."""
    if version is None:
        import vllm
        version = getattr(vllm, "__version__", "unknown")
    base = ".".join(str(version).split("+")[0].split(".")[:2])
    if base not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"blocktable.vllm supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
            f"found vLLM {version}. Unset {ENV_SEGMENT} to run vLLM without blocktable.")
    return version


def register():
    """vLLM's general-plugin hook. Does nothing unless BLOCKTABLE_VLLM is set."""
    global _registered
    if _registered or not enabled():
        return
    check_version()
    from . import scheduler, worker
    scheduler.install()
    worker.install()
    _registered = True
