"""KV and recurrent-state bytes per architecture against what llama.cpp itself logs.

For every tiny model (tests/arch_models.py), at two context sizes, for f16, q8_0, q4_0 and q8_0 K +
q4_0 V, the bytes kvproxy.model.memory computes must equal llama.cpp's logged ``llama_kv_cache: size``
of each cache (full attention and sliding window) within 1 % or the log's own rounding (it prints
MiB to two decimals), with the same cell and layer counts; the recurrent state of the hybrid Qwen
models must equal ``llama_memory_recurrent: size`` and not move with the KV types. llama-server
with ``-np 1`` and ``-np 4`` (not unified: a stream per slot) and its default (4 unified slots) is
checked on the real Gemma 3 270M, whose sliding-window cache the old unified sizing got 5 % wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvproxy.config import KVCacheType as T
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import ggml_type, kv_cache_parts, kv_cells, kv_memory_summary
from tests.arch_models import ARCHS, tiny_model
from tests.llama_logged_memory import Logged, logged_contexts, parse, within_log_precision
from tests.llama_servers import start_llama_server

TYPES = [(T.F16, T.F16), (T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q8_0, T.Q4_0)]
CONTEXTS = [4096, 16384]
CONFIGS = [(n_ctx, k, v, True) for n_ctx in CONTEXTS for k, v in TYPES]


def _check(path: Path, configs: list[tuple[int, T, T, bool]], logged: list[Logged], n_seq: int = 1) -> None:
    shape = read_model_info(path).attention
    recurrent = set()
    for (n_ctx, k, v, fa), got in zip(configs, logged, strict=True):
        cells = kv_cells(shape, n_ctx, n_seq=n_seq)
        parts = kv_cache_parts(shape, k, v, n_ctx, n_seq=n_seq, flash_attn=fa)
        layers = shape.kv_layers()
        expected = [
            (parts[0], cells.full, sum(not la.swa for la in layers)),
            (parts[1], cells.swa, sum(la.swa for la in layers)),
        ]
        expected = [e for e in expected if e[2]]  # llama.cpp makes no cache without layers
        label = f"{path.name} n_ctx={n_ctx} K={k.value} V={v.value} fa={fa}"
        assert len(got.kv_mib) == len(expected), label
        for (mine, n_cells, n_layers), mib, c, nl in zip(
            expected, got.kv_mib, got.kv_cells, got.kv_layers, strict=True
        ):
            assert (c, nl) == (n_cells, n_layers), label
            assert within_log_precision(mine, mib), f"{label}: {mine / 2**20:.4f} MiB, logged {mib}"
        if shape.recurrent_layers:
            assert got.recurrent_mib is not None, label
            assert within_log_precision(shape.recurrent_bytes(n_seq), got.recurrent_mib), label
            recurrent.add(got.recurrent_mib)
        else:
            assert got.recurrent_mib is None, label
    assert len(recurrent) <= 1  # -ctk/-ctv leave the recurrent state alone


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_and_recurrent_bytes_equal_llama_cpp_logs(arch: str) -> None:
    path = tiny_model(arch)
    configs = list(CONFIGS)
    if arch == "gemma4":  # without flash attention V is padded to the widest layer's (here 256 vs 128)
        configs.append((4096, T.F16, T.F16, False))
    logged = logged_contexts(
        path,
        [
            {"n_ctx": n, "type_k": int(ggml_type(k)), "type_v": int(ggml_type(v)), "flash_attn": fa}
            for n, k, v, fa in configs
        ],
    )
    _check(path, configs, logged)


def test_hybrid_shapes_from_the_gguf() -> None:
    """Qwen3.5: layer 0 is recurrent, layer 1 attention (``attention.recurrent_layers``); the state
    is llama.cpp's n_embd_r = (conv 4 - 1) x (inner 256 + 2 x 2 groups x state 128) and n_embd_s =
    128 x 256, in f32."""
    for arch in ("qwen35", "qwen35moe"):
        shape = read_model_info(tiny_model(arch)).attention
        assert [la.index for la in shape.kv_layers()] == [1]
        assert shape.recurrent_layers == {0}
        assert shape.recurrent is not None
        assert (shape.recurrent.conv_values, shape.recurrent.state_values) == (2304, 32768)
        assert shape.recurrent_bytes() == 140288
        assert shape.recurrent_bytes(4) == 4 * 140288
        # the saving is a KV figure: the state is beside it, the same for every KV type
        q4 = kv_memory_summary(shape, T.Q4_0, T.Q4_0, 4096)
        f16 = kv_memory_summary(shape, T.F16, T.F16, 4096)
        assert q4["recurrent_bytes"] == f16["recurrent_bytes"] == 140288
        assert q4["saved_fraction"] == pytest.approx(1 - 144 / 512)


def test_shared_kv_layers_hold_none() -> None:
    shape = read_model_info(tiny_model("gemma4")).attention
    layers = shape.kv_layers()
    assert [la.index for la in layers] == [0, 1, 2, 3]  # 4 and 5 read layers 2 and 3
    assert [(la.swa, la.k_values) for la in layers] == [(True, 256)] * 3 + [(False, 128)]


def _llama_server_log(model: Path, tmp_path: Path, *args: str) -> str:
    srv = start_llama_server(
        model, tmp_path, "-fit", "off", "-lv", "4", *args
    )  # -lv 4: llama.cpp's own lines
    try:
        return srv.log.read_text()
    finally:
        srv.kill()


@pytest.mark.parametrize(
    ("slots", "unified"),
    [(["-np", "1"], False), (["-np", "4"], False), ([], True)],  # no -np: 4 slots, unified
    ids=["np1", "np4", "default"],
)
def test_llama_server_slots_on_gemma3_270m(
    slots: list[str], unified: bool, gemma_path: Path, tmp_path: Path
) -> None:
    shape = read_model_info(gemma_path).attention
    n_seq = int(slots[1]) if slots else 4
    n_ctx = 131072
    for k in (T.F16, T.Q4_0):
        log = _llama_server_log(
            gemma_path, tmp_path, "-c", str(n_ctx), "-ctk", k.value, "-ctv", k.value, *slots
        )
        assert f"kv_unified = '{str(unified).lower()}'" in log
        got = parse(log)
        cells = kv_cells(shape, n_ctx, n_seq=n_seq, kv_unified=unified)
        full, swa = kv_cache_parts(shape, k, k, n_ctx, n_seq=n_seq, kv_unified=unified)
        assert got.kv_cells == (cells.full, cells.swa)
        for mine, mib in zip((full, swa), got.kv_mib, strict=True):
            assert mine / 2**20 == pytest.approx(mib, rel=0.01), (k, slots, mine / 2**20, mib)
        if not unified and n_seq == 4:
            assert cells.swa == 1024  # 512-token window + 512-token micro-batch, per stream


def test_llama_server_recurrent_state_per_slot(tmp_path: Path) -> None:
    """A recurrent state per sequence: 4 slots keep 4 states."""
    path = tiny_model("qwen35moe")
    shape = read_model_info(path).attention
    log = _llama_server_log(path, tmp_path, "-c", "4096", "-np", "4", "-ctk", "q4_0", "-ctv", "q4_0")
    got = parse(log)
    assert re.search(r"llama_memory_recurrent: size =\s+[0-9.]+ MiB \(\s*4 cells", log)
    assert got.recurrent_mib is not None
    assert within_log_precision(shape.recurrent_bytes(4), got.recurrent_mib)
    _check(path, [(4096, T.Q4_0, T.Q4_0, True)], [got], n_seq=4)


def test_deployments_file_sizes_a_llama_server_as_it_was_started(gemma_path: Path, tmp_path: Path) -> None:
    """The `server` table says how the primary's llama-servers run (-c 131072 -np 4, a stream per
    slot): the status and the metrics then give what that llama-server logs (issue 18: 124.88 MiB
    at q4_0, where one unified stream's sizing read 118.55)."""
    from prometheus_client import CollectorRegistry

    from kvproxy.config import Settings
    from kvproxy.deployments.build import build_deployments
    from kvproxy.deployments.spec import ProxyConfig
    from kvproxy.deployments.status import memory_status
    from kvproxy.model.memory import kv_cache_allocated_bytes
    from kvproxy.telemetry.metrics import Metrics

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gemma.gguf").symlink_to(gemma_path)
    cfg = tmp_path / "deployments.toml"
    cfg.write_text(
        '[[deployments]]\nmodel = "gemma-q4"\n'
        '[deployments.primary]\nurls = ["http://127.0.0.1:9"]\ncache_type_k = "q4_0"\n'
        '[deployments.primary.server]\nmodel = "models/gemma.gguf"\nctx_size = 131072\nparallel = 4\n'
    )
    metrics = Metrics(CollectorRegistry())
    [d] = build_deployments(ProxyConfig.from_file(cfg), Settings(), metrics=metrics)
    m = memory_status(d)
    assert m is not None
    shape = read_model_info(gemma_path).attention
    q4 = T.Q4_0
    assert m["allocated_bytes"] == kv_cache_allocated_bytes(shape, q4, q4, 131072, n_seq=4)
    assert m["allocated_bytes"] / 2**20 == pytest.approx(124.88, abs=0.005)
    assert m["f16_allocated_bytes"] / 2**20 == pytest.approx(444.00, abs=0.005)
    labels = {"deployment": "gemma-q4", "role": "primary", "cache_type_k": "q4_0", "cache_type_v": "q4_0"}
    assert metrics.registry.get_sample_value("kvproxy_kv_cache_bytes", labels) == m["allocated_bytes"]


def test_cells_per_stream_by_hand() -> None:
    """Pure arithmetic, Gemma 3 270M (512-token window on 15 of 18 layers, one 256-wide KV head)."""
    from kvproxy.model.memory import AttentionShape, kv_cache_allocated_bytes

    shape = AttentionShape(18, 1, 256, 256, 512, frozenset(i for i in range(18) if i % 6 < 5))
    one = kv_cells(shape, 16000)  # padded to 16,128; the window cache pad(512 + 512)
    assert (one.full, one.swa, one.streams) == (16128, 1024, 1)
    np4 = kv_cells(shape, 131072, n_seq=4)  # a stream per slot
    assert (np4.full, np4.swa, np4.streams) == (32768, 1024, 4)
    unified = kv_cells(shape, 131072, n_seq=4, kv_unified=True)  # one stream, 4 windows
    assert (unified.full, unified.swa, unified.streams) == (131072, 2560, 1)
    f16 = 2 * 256 * 2  # K + V bytes of a cell in one layer
    assert kv_cache_allocated_bytes(shape, T.F16, T.F16, 131072, n_seq=4) == f16 * 4 * (3 * 32768 + 15 * 1024)
    assert kv_cache_allocated_bytes(shape, T.F16, T.F16, 131072, n_seq=4) / 2**20 == 444.0
    assert kv_cache_allocated_bytes(shape, T.F16, T.F16, 131072, n_seq=4, kv_unified=True) / 2**20 == 421.5
    # -np 3: 1,024 padded cells / 3 = 341 a stream, padded again to 512 (llama.cpp then says n_ctx 1,536)
    assert kv_cells(shape, 1000, n_seq=3).full == 512


def test_a_server_table_that_does_not_match_the_llama_server_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The figures follow the file; a llama-server whose /props counts other slots is named in the log."""
    import asyncio
    import logging

    from kvproxy.config import Settings
    from kvproxy.deployments.build import build_deployments
    from kvproxy.deployments.http import HttpDeployment
    from kvproxy.deployments.spec import ProxyConfig

    path = tiny_model("qwen35moe")
    srv = start_llama_server(path, tmp_path, "-c", "1024", "-np", "1")
    try:
        for declared, warned in ((1, False), (2, True)):
            cfg = tmp_path / f"d{declared}.toml"
            cfg.write_text(
                f'[[deployments]]\nmodel = "q"\n[deployments.primary]\nurls = ["{srv.url}"]\n'
                f'cache_type_k = "q4_0"\n[deployments.primary.server]\nmodel = "{path}"\n'
                f"ctx_size = 1024\nparallel = {declared}\n"
            )
            [d] = build_deployments(ProxyConfig.from_file(cfg), Settings())
            assert isinstance(d, HttpDeployment)
            m = d.kv_figures()
            assert m is not None and m["recurrent_bytes"] == declared * 140288

            async def check(d: HttpDeployment = d) -> None:
                try:
                    await d.check_servers()
                finally:
                    await d.primary_pool.close()

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="kvproxy.deployments.http"):
                asyncio.run(check())
            assert ("runs 1 slots, its server table says 2" in caplog.text) == warned
    finally:
        srv.kill()
