"""Latency tables and the millisecond budget: caching, keys, options, allocation. No timing assertions."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.engines import latency as L
from lrprune_caffe.ir.net import Layer, Net
from lrprune_caffe.lowrank import latency_budget as lb
from lrprune_caffe.lowrank import rank as rk


def small_net():
    rng = np.random.default_rng(0)
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([1, 4, 12, 12])
    conv = Layer("conv1", "Convolution", ["data"], ["conv1"])
    cp = conv.msg.convolution_param
    cp.num_output, cp.kernel_size[:], cp.pad[:] = 16, [3], [1]
    conv.blobs = [rng.standard_normal((16, 4, 3, 3)).astype(np.float32), np.zeros(16, np.float32)]
    relu = Layer("relu1", "ReLU", ["conv1"], ["conv1"])
    ip = Layer("ip1", "InnerProduct", ["conv1"], ["ip1"])
    ip.msg.inner_product_param.num_output = 10
    ip.blobs = [rng.standard_normal((10, 16 * 144)).astype(np.float32), np.zeros(10, np.float32)]
    return Net(name="small", layers=[inp, conv, relu, ip])


@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the only two places that time anything; count the graphs 'measured'."""
    calls = []

    def fake_measure(model_bytes, feeds, target, external=True, cold=False):
        calls.append(len(model_bytes))
        if not external:  # the per-run overhead (an Identity)
            return {"ms": 0.01}
        return {"ms": 1.0 - len(calls) * 0.001, "runs": 1, "min": 1.0, "max": 1.0}  # every chain faster

    def fake_profile(net, target):
        calls.append("profile")
        return {"runs": 1, "run_ms": 10.0, "layers": {"conv1": 2.0, "ip1": 1.0, "relu1": 0.5}, "other_ms": 0.0,
                "wall_ms": 5.0}

    monkeypatch.setattr(L, "measure_model", fake_measure)
    monkeypatch.setattr(L, "profile_net", fake_profile)
    monkeypatch.setattr(L, "net_runner", lambda net, target: (lambda: None))
    monkeypatch.setattr(L, "time_runs", lambda run, **kw: (calls.append("net"), {"ms": 5.0})[1])
    return calls


def test_second_call_measures_nothing(tmp_path, fake_timer):
    net = small_net()
    infos, skipped = L.net_infos(net)
    assert set(infos) == {"conv1", "ip1"} and not skipped
    target = L.Target("onnxruntime", 1, 1)
    first = L.layer_tables(infos, "channel", target, net=net, directory=tmp_path)
    n_first = len(fake_timer)
    assert n_first == first.measured > 0 and first.total_ms == 3.5  # the profiled parts: 2 + 1 + 0.5
    # calibrated: left alone = the layer's in-net time, its chains scaled alike
    conv = first.tables["conv1"]
    assert conv.left_alone_ms == pytest.approx(2.0) and first.tables["ip1"].left_alone_ms == pytest.approx(1.0)
    assert conv.scale == pytest.approx(2.0 / (first.tables["conv1"].left_alone_ms / conv.scale))
    second = L.layer_tables(infos, "channel", target, net=net, directory=tmp_path)
    assert len(fake_timer) == n_first and second.measured == 0
    for name in infos:
        a, b = first.tables[name], second.tables[name]
        assert a.left_alone_ms == b.left_alone_ms
        np.testing.assert_array_equal(a.ms, b.ms)
        np.testing.assert_array_equal(a.axes[0], b.axes[0])
    # another scheme for the same geometry reuses the layer's left-alone time, measures only its chains
    L.layer_tables({"conv1": infos["conv1"]}, "spatial", target, directory=tmp_path)
    assert len(fake_timer) == n_first + len(L.rank_grid(infos["conv1"], "spatial")[0])  # left alone is cached


def test_cache_keys_differ_by_threads_and_batch(tmp_path):
    t1, t2, b4 = L.Target(threads=1), L.Target(threads=2), L.Target(threads=1, batch=4)
    paths = {L.Cache(t, tmp_path).path for t in (t1, t2, b4)}
    assert len(paths) == 3
    assert t1.key()["threads"] == 1 and t2.key()["threads"] == 2
    for field in ("runtime", "version", "machine", "cpu", "cores"):
        assert field in t1.key()


def test_time_budget_stops_and_says_so(tmp_path, fake_timer):
    infos, _ = L.net_infos(small_net())
    res = L.layer_tables(infos, "channel", L.Target(), directory=tmp_path, time_budget_s=0.0)
    assert not res.complete and not res.tables and "budget ran out" in res.notes[0]


def test_geometry_batch_and_signature():
    infos, _ = L.net_infos(small_net())
    g1, g4 = L.geometry(infos["conv1"], 1), L.geometry(infos["conv1"], 4)
    assert g4["batch"] == 4 and L.signature(g1) != L.signature(g4)
    assert L.geometry(infos["ip1"], 8)["rows"] == 8


def test_rank_grid_stops_at_the_mac_break_even():
    infos, _ = L.net_infos(small_net())
    info = infos["conv1"]  # 4*9 = 36 -> 16: channel break-even r <= 36*16 / (36+16) = 11.07
    (grid,) = L.rank_grid(info, "channel")
    assert grid[0] == 1 and grid[-1] == 11
    macs, _ = info.cost("channel", (np.asarray(grid),))
    assert np.all(macs <= info.macs)
    r1, r2 = L.rank_grid(info, "tucker2")
    assert r1[0] == 1 and r2[0] == 1


def _conv_info(c=8, n=12, k=(3, 3), stride=(1, 1), pad=(1, 1), dilation=(1, 1), group=1, hw=(9, 11)):
    from lrprune_caffe.ir.analysis import infer_shapes
    from lrprune_caffe.transforms.factorize import layer_info
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([1, c, *hw])
    conv = Layer("conv", "Convolution", ["data"], ["conv"])
    cp = conv.msg.convolution_param
    cp.num_output = n
    cp.kernel_h, cp.kernel_w = k
    cp.stride_h, cp.stride_w = stride
    cp.pad_h, cp.pad_w = pad
    cp.dilation[:] = [dilation[0]]
    cp.group = group
    conv.blobs = [np.zeros((n, c // group, *k), np.float32), np.zeros(n, np.float32)]
    net = Net("one", [inp, conv])
    shapes = infer_shapes(net)
    return layer_info(conv, shapes.inputs["conv"][0], shapes.outputs["conv"][0])


@pytest.mark.parametrize("kw", [{}, {"stride": (2, 1), "pad": (0, 2), "k": (3, 5)}, {"dilation": (2, 2), "pad": (2, 2)},
                                {"group": 2, "stride": (2, 2)}])
def test_candidate_graphs_have_the_layers_output_shape(kw):
    """onnxruntime runs every tiny graph; each chain yields the shape our IR infers for the layer."""
    import onnxruntime as ort
    info = _conv_info(**kw)
    geo = L.geometry(info, 2)
    expect = (2, *info.out_shape[1:])
    for scheme, ranks in ((None, ()), ("channel", (3,)), ("spatial", (2,)), ("tucker2", (2, 3))):
        model, feeds = L.layer_model(geo, scheme, ranks)
        sess = L.session(model, L.Target(), external=True)
        (y,) = sess.run(None, feeds)
        assert y.shape == expect, (scheme, kw)
    assert isinstance(ort.__version__, str)


def test_fc_graphs_and_large_weights_from_the_shared_file():
    infos, _ = L.net_infos(small_net())
    geo = L.geometry(infos["ip1"], 3)
    geo["k"] = 1 << 16  # (r, K) and (N, K) weights above the external-data threshold
    for scheme, ranks in ((None, ()), ("fc", (8,))):
        model, feeds = L.layer_model(geo, scheme, ranks)
        assert len(model) < 10_000  # the weights are not inside the model
        (y,) = L.session(model, L.Target(), external=True).run(None, feeds)
        assert y.shape == (3, 10)


# ---------------------------------------------------------------------------
# the budget (pure)

def test_interpolation():
    np.testing.assert_allclose(lb.interp_1d([1, 5], [1.0, 9.0], [1, 3, 5]), [1, 5, 9])
    assert np.isnan(lb.interp_1d([1, 5], [1.0, 9.0], [6])[0])
    v = lb.interp_2d([1, 3], [1, 5], np.array([[0.0, 4.0], [2.0, 6.0]]), [2, 1, 3], [3, 5, 1])
    np.testing.assert_allclose(v, [3.0, 4.0, 2.0])
    # a corner not measured poisons only the points that use it
    w = lb.interp_2d([1, 3], [1, 5], np.array([[0.0, 4.0], [2.0, np.nan]]), [1, 2], [3, 3])
    assert w[0] == 2.0 and np.isnan(w[1])


def test_options_slower_than_left_alone_are_dropped():
    table = lb.LayerTable("a", 10.0, "channel", (np.array([1, 4, 8]),), np.array([2.0, 6.0, 12.0]))
    ranks = np.arange(1, 11)[:, None]  # 9 and 10 lie outside the measured grid
    opts, slower, outside = lb.latency_options(table, ranks, np.linspace(1, 0, 10))
    # ms(6) = 6 + 2*1.5 = 9 < 10; ms(7) = 10.5, ms(8) = 12: not faster than left alone
    assert opts.ranks[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert (slower, outside) == (2, 2)
    assert np.all(opts.macs < 10.0)


def test_allocation_meets_the_target_at_the_hand_checked_optimum():
    # layer a (left alone 10 ms): 4 ms err 1.0, 6 ms err 0.3, 8 ms err 0.1 (11 ms: slower, never bought)
    # layer b (left alone 10 ms): 5 ms err 0.5, 7 ms err 0.2
    a = lb.LayerTable("a", 10.0, "channel", (np.array([1, 2, 3, 4]),), np.array([4.0, 6.0, 8.0, 11.0]))
    b = lb.LayerTable("b", 10.0, "channel", (np.array([1, 2]),), np.array([5.0, 7.0]))
    oa, slower_a, _ = lb.latency_options(a, [[1], [2], [3], [4]], [1.0, 0.3, 0.1, 0.0])
    ob, _, _ = lb.latency_options(b, [[1], [2]], [0.5, 0.2])
    assert slower_a == 1
    # whole net 25 ms: 5 ms fixed; speed-up 25/19 -> target 19 ms -> the layers get 14 ms.
    # Within 14 ms: a6+b7 = 13 (err 0.5), a8+b5 = 13 (0.6), a4+b10 = 14 (1.0), a4+b7 (1.2): a6+b7 is optimal.
    alloc = lb.allocate([oa, ob], total_ms=25.0, speedup=25.0 / 19.0)
    assert alloc.fixed_ms == 5.0 and alloc.target_ms == pytest.approx(19.0)
    assert alloc.choice == {"a": (2,), "b": (2,)}
    assert alloc.predicted_ms == pytest.approx(18.0) and alloc.predicted_ms <= alloc.target_ms
    with pytest.raises(lb.Unreachable) as e:
        lb.allocate([oa, ob], total_ms=25.0, speedup=3.0)
    assert e.value.best_ms == pytest.approx(14.0)  # 5 fixed + a 4 + b 5


def test_layer_without_options_counts_as_left_alone():
    empty = rk.LayerChoices("c", 3.0)
    b = lb.LayerTable("b", 10.0, "channel", (np.array([1, 2]),), np.array([5.0, 7.0]))
    ob, _, _ = lb.latency_options(b, [[1], [2]], [0.5, 0.2])
    alloc = lb.allocate([empty, ob], total_ms=13.0, speedup=1.2)
    assert alloc.choice == {"c": None, "b": (2,)} and alloc.fixed_ms == 0.0


# ---------------------------------------------------------------------------
# calibration against the profiled net

def test_profiled_kernels_belong_to_the_longest_caffe_layer_name():
    from lrprune_caffe.engines.latency_net import owner
    names = sorted(["conv1", "conv1_relu", "res2a", "res2a_branch2c", "fc6", "conv2/3x3", "conv2/3x3_reduce"],
                   key=len, reverse=True)
    assert owner("conv1/conv1_relu_nchwc", names) == "conv1"  # onnxruntime's fused Conv + Relu
    assert owner("conv1_relu", names) == "conv1_relu"
    assert owner("res2a_branch2c/scale_res2a_branch2c_nchwc", names) == "res2a_branch2c"
    assert owner("fused fc6", names) == "fc6"  # Gemm + Relu
    assert owner("conv2/3x3_reduce/conv2/3x3_reduce_relu_nchwc", names) == "conv2/3x3_reduce"
    assert owner("conv2/3x3/conv2/3x3_relu_nchwc", names) == "conv2/3x3"
    assert owner("ReorderOutput", names) == ""


def _events(runs):
    """Profiler events: each run a list of (node, dur us), one after another."""
    ev, ts = [], 0
    for kernels in runs:
        start = ts
        for node, dur in kernels:
            ev.append({"cat": "Node", "name": f"{node}_kernel_time", "ts": ts, "dur": dur})
            ts += dur
        ev.append({"cat": "Session", "name": "model_run", "ts": start, "dur": ts - start})
        ts += 10
    return ev


def test_parse_profile_drops_warmup_and_splits_a_run_by_median_shares():
    from lrprune_caffe.engines.latency_net import parse_profile, profile_total
    run = [("conv1/conv1_relu_nchwc", 1000), ("ReorderOutput", 100), ("fused fc6", 2000)]
    burst = [("conv1/conv1_relu_nchwc", 9000), ("ReorderOutput", 100), ("fused fc6", 2000)]
    ev = _events([[("conv1/conv1_relu_nchwc", 50000), ("fused fc6", 50000)], run, burst, run, run])
    p = parse_profile(ev, ["conv1", "conv1_relu", "fc6", "data"], warmup=1)
    assert p["runs"] == 4 and p["layers"] == pytest.approx({"conv1": 1.0, "fc6": 2.0})
    assert p["other_ms"] == pytest.approx(0.1)
    assert profile_total(p) == pytest.approx(3.1)  # median shares of the lower-quartile run
    half = parse_profile(ev, ["conv1", "fc6"], warmup=1, totals=[1.55, 9.0, 1.55, 1.55])  # e.g. CPU time per run
    assert half["layers"] == pytest.approx({"conv1": 0.5, "fc6": 1.0})


def test_calibrate_scales_a_layers_row_to_its_in_net_time():
    t = lb.LayerTable("a", 4.0, "channel", (np.array([1, 8]),), np.array([1.0, 3.0]))
    c = lb.calibrate(t, 6.0)
    assert c.left_alone_ms == 6.0 and c.scale == 1.5
    np.testing.assert_allclose(c.ms, [1.5, 4.5])
    assert lb.calibrate(t, 400.0).scale == 4.0  # clipped: the profile and the table disagree about what was timed
    assert lb.calibrate(t, float("nan")) is t


def test_a_row_stops_after_two_chains_no_faster_than_left_alone(tmp_path, monkeypatch):
    times = iter([10.0] + [5.0, 8.0, 11.0, 12.0] + [10.0] * 20)  # left alone, then chains by rising rank

    def fake(model_bytes, feeds, target, external=True, cold=False):
        return {"ms": 0.0 if not external else next(times)}

    monkeypatch.setattr(L, "measure_model", fake)
    infos, _ = L.net_infos(small_net())
    tb = L.layer_tables({"conv1": infos["conv1"]}, "channel", L.Target(), directory=tmp_path, timing="hot")
    ms = tb.tables["conv1"].ms
    assert ms[:4].tolist() == [5.0, 8.0, 11.0, 12.0] and np.all(np.isnan(ms[4:]))
    ranks, err = lb.rank_candidates([type("S", (), {"energies": np.linspace(1, 0.1, 36)})()], tb.tables["conv1"])
    opts, slower, outside = lb.latency_options(tb.tables["conv1"], ranks, err)
    assert np.all(opts.macs < 10.0) and outside > 0  # the ranks not measured are never offered


def test_correct_chains_scales_the_factorized_entries_only():
    t = lb.LayerTable("a", 4.0, "channel", (np.array([1, 8]),), np.array([1.0, 3.0]), scale=1.5)
    c = lb.correct_chains(t, 1.2)
    assert c.left_alone_ms == 4.0 and c.scale == 1.5
    np.testing.assert_allclose(c.ms, [1.2, 3.6])
    np.testing.assert_allclose(lb.correct_chains(t, 9.0).ms, [2.0, 6.0])  # clipped to 2x
    np.testing.assert_allclose(lb.correct_chains(t, float("nan")).ms, t.ms)


def test_time_runs_stops_once_the_two_fastest_runs_agree():
    ticks = iter([0, 50, 50, 60, 60, 80, 80, 90.2, 90.2, 100.2] + list(range(200, 400)))  # ms, one pair per run
    clock = lambda: next(ticks) / 1e3  # noqa: E731
    res = L.time_runs(lambda: None, clock=clock, min_runs=2, max_runs=12, warmups=0, agree=0.03, budget_s=1.0)
    # first run 50 ms (a warm-up), then 10, 20, 10.2 ms: 10 and 10.2 agree within 3%, so it stops at 3 runs
    assert res["runs"] == 3 and res["agreed"] and res["low"] == pytest.approx(10.0)
    ticks = iter(range(0, 10000, 7))  # every run 7 ms: agreement after the minimum
    res = L.time_runs(lambda: None, clock=lambda: next(ticks) / 1e3, min_runs=2, warmups=0, agree=0.03)
    assert res["runs"] == 2 and res["agreed"]


def test_left_alone_is_timed_again_only_when_its_runs_did_not_agree(tmp_path, monkeypatch):
    infos, _ = L.net_infos(small_net())
    for agreed, extra in ((True, 0), (False, 1)):
        calls = []

        def fake(model_bytes, feeds, target, external=True, cold=False, agreed=agreed):
            calls.append(external)
            return {"ms": 0.0 if not external else 10.0 - len(calls) * 0.01, "agreed": agreed}

        monkeypatch.setattr(L, "measure_model", fake)
        L.layer_tables({"conv1": infos["conv1"]}, "channel", L.Target(), directory=tmp_path / str(agreed),
                       timing="hot")
        grid = len(L.rank_grid(infos["conv1"], "channel", *L.grid_points(10.0))[0])
        assert sum(calls) == 1 + grid + extra  # left alone, its chains (all faster), left alone again or not


def test_net_runner_reads_large_weights_from_a_file_and_computes_the_same():
    from lrprune_caffe.engines.runtime import default_inputs, run_onnxruntime
    from lrprune_caffe.engines.latency_net import _ExternalWeights
    net = small_net()
    assert net.layer("ip1").blobs[0].nbytes >= _ExternalWeights.MIN_BYTES  # so ip1's weight goes to the file
    target = L.Target()
    out = L.net_runner(net, target)()[0]
    ref = run_onnxruntime(net, default_inputs(net, seed=0, batch=1))
    np.testing.assert_allclose(out, list(ref.values())[0], rtol=1e-5, atol=1e-6)


def test_correct_savings_scales_what_each_entry_saves_against_left_alone():
    t = lb.LayerTable("c", 4.0, "channel", (np.array([1, 2]),), np.array([1.0, 3.0]))
    np.testing.assert_allclose(lb.correct_savings(t, 0.5).ms, [2.5, 3.5])  # saved 3 and 1: now 1.5 and 0.5
    np.testing.assert_allclose(lb.correct_savings(t, 0.01).ms, [3.25, 3.75])  # clipped to 0.25
    assert lb.correct_savings(t, 0.5).left_alone_ms == 4.0


def test_checked_speedup_warms_both_alike_and_takes_the_lower_median():
    """Both runners are warmed up before any timed round (a cold first run would flatter the one timed
    second), rounds are interleaved, and with one thread the check is the lower of wall and CPU medians."""
    import time as _t
    calls = {"a": 0, "b": 0}

    def spin(ms, key):
        def run():
            calls[key] += 1
            t0 = _t.process_time()
            while _t.process_time() - t0 < ms / 1e3:
                pass
        return run
    m = L.checked_speedup(spin(2.0, "a"), spin(1.0, "b"), L.Target(), budget_s=0.03, min_rounds=4,
                          max_rounds=6, warmup_s=0.005)
    assert 4 <= m["rounds"] <= 6 and min(calls.values()) >= 3 + m["rounds"]
    assert m["speedup_checked"] == min(m["paired_median"], m["cpu_paired_median"])
    assert 1.3 < m["speedup_checked"] < 2.6


def test_net_runner_removes_its_weight_file_without_a_warning(recwarn):
    """The runner's exported model lives in a temporary folder removed with the runner, explicitly:
    an implicit clean-up printed 'ResourceWarning: Implicitly cleaning up' on compress's console."""
    import gc
    import tempfile
    from pathlib import Path

    from conftest import lenet_files
    from lrprune_caffe.engines.latency_net import net_runner
    from lrprune_caffe.io.caffe import load_net
    _, proto, model = lenet_files()
    before = set(Path(tempfile.gettempdir()).glob("lrprune-net-*"))
    run = net_runner(load_net(proto, model), L.Target())
    run()
    assert len(set(Path(tempfile.gettempdir()).glob("lrprune-net-*")) - before) == 1
    del run
    gc.collect()
    assert set(Path(tempfile.gettempdir()).glob("lrprune-net-*")) - before == set()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
