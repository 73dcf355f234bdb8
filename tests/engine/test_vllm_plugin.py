"""blocktable.vllm's pieces that need no engine: the switch, the version
check, request keys, segment sizing. Runs only where vLLM imports."""
import os
import subprocess
import sys
from hashlib import blake2b

import pytest

pytest.importorskip("vllm.v1.core.block_pool")

import blocktable.vllm as btv  # noqa: E402
from blocktable.vllm import _seg  # noqa: E402
from blocktable.vllm.keys import request_key  # noqa: E402


def test_version_check():
    assert btv.check_version("0.32.0") == "0.32.0"
    assert btv.check_version("0.32.3+cpu") == "0.32.3+cpu"
    for bad in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=bad.replace(".", r"\.")) as e:
            btv.check_version(bad)
        assert "0.32.x" in str(e.value)


def test_installed_vllm_is_supported():
    import vllm
    btv.check_version(vllm.__version__)


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKTABLE_VLLM")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=120)


def test_register_is_a_noop_without_the_variable():
    code = ("import blocktable.vllm as b\n"
            "from vllm.v1.core import kv_cache_coordinator as kc\n"
            "from vllm.v1.core.block_pool import BlockPool\n"
            "b.register()\n"
            "assert kc.BlockPool is BlockPool\n"
            "import sys; assert 'blocktable.vllm.scheduler' not in sys.modules\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_register_patches_with_the_variable():
    code = ("import blocktable.vllm as b\n"
            "from vllm.v1.core import kv_cache_coordinator as kc\n"
            "from vllm.v1.worker.block_table import BlockTable\n"
            "orig = BlockTable.append_row\n"
            "b.register(); b.register()\n"
            "from blocktable.vllm.pool import SharedBlockPool\n"
            "assert kc.BlockPool is SharedBlockPool\n"
            "assert BlockTable.append_row is not orig\n")
    r = _run(code, BLOCKTABLE_VLLM="pytest-unused")
    assert r.returncode == 0, r.stderr[-2000:]
    # with the check on, vLLM keeps its own ids (append_row untouched)
    code2 = code.replace("is not orig", "is orig")
    r = _run(code2, BLOCKTABLE_VLLM="pytest-unused", BLOCKTABLE_VLLM_CHECK="1")
    assert r.returncode == 0, r.stderr[-2000:]


def test_plugin_is_an_entry_point():
    from importlib.metadata import entry_points
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("blocktable") == "blocktable.vllm:register"


def test_request_key_derivation():
    want = int.from_bytes(blake2b(b"req-7\x00" + (2).to_bytes(4, "little"),
                                  digest_size=8).digest(), "little")
    assert request_key("req-7", 2) == want
    assert request_key("req-7") == request_key("req-7", 0)
    assert len({request_key("req-7", i) for i in range(100)}) == 100
    assert request_key("req-7", 0) != request_key("req-8", 0)
    assert 0 <= request_key("x") < 2 ** 64


def test_segment_config_and_fit():
    need = _seg.segment_config(num_blocks=40, block_size=32, max_num_seqs=8, max_model_len=512,
                               cache_pools=1)
    assert need == {"block_size": 32, "num_pools": 1, "blocks_per_pool": 40, "num_rows": 32,
                    "row_width": 17, "cache_pools": 1}
    _seg.check_fits("s", dict(need, num_rows=64), need)
    with pytest.raises(RuntimeError) as e:
        _seg.check_fits("s", dict(need, row_width=8), need)
    msg = str(e.value)
    assert "row_width=8" in msg and "row_width=17" in msg and "'s'" in msg
    with pytest.raises(RuntimeError, match="block_size=16"):
        _seg.check_fits("s", dict(need, block_size=16), need)
