"""CPU rules: the built-in table, the calibration file (round trip, exact machine key, the
environment switch), the derivation of rules from timings (fake timer) and `softvq-fast env` /
`softvq-fast calibrate`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from support.machines import machine  # noqa: F401  (fixture)
from support.onednn import needs_onednn

from softvq_fast import cli
from softvq_fast.ops import calibration, cpu_rules
from softvq_fast.ops.attention import BACKENDS as ATTENTION
from softvq_fast.ops.attention import AttentionInputs
from softvq_fast.ops.attention.custom_op import kernel_op_available
from softvq_fast.ops.calibration import Case, calibrate, derive_window

ZEN4 = ("AuthenticAMD", "AVX512", 2)
OURS = "softvq" if kernel_op_available() else "sdpa"


def fake_timer(first_wins):
    """A timer that makes the op's own backend 1 ms and the default 2 ms where
    first_wins(case) holds, the other way round elsewhere; records the cases it saw."""
    seen = []

    def timer(case, calls):
        seen.append(case)
        first, default = calibration.PLANS[case.op].first, calibration.PLANS[case.op].default
        assert set(calls) == {first, default}
        fast = first_wins(case)
        return {first: 1e-3 if fast else 2e-3, default: 2e-3 if fast else 1e-3}

    timer.seen = seen
    return timer


def attention_rule_case(case):
    """softvq faster in float32 forwards up to 128 keys, with gradients from 64 to 1089 keys, in
    bfloat16 forwards everywhere, never in bfloat16 with gradients."""
    kv = case.features["kv_len"]
    if case.dtype == torch.bfloat16:
        return not case.needs_grad
    return 64 <= kv <= 1089 if case.needs_grad else kv <= 128


def linear_rule_case(case):
    """onednn faster from 2^20 multiply-adds with at least 256 input features, and with gradients
    from 2^26 multiply-adds with at least 384."""
    if case.needs_grad:
        return case.features["macs"] >= 2**26 and case.features["in_features"] >= 384
    return case.features["macs"] >= 2**20 and case.features["in_features"] >= 256


def _auto(dtype, kv_len, needs_grad=False):
    return ATTENTION.select(AttentionInputs(torch.device("cpu"), dtype, needs_grad, 1, 2, 5, kv_len, 16, True)).name


def test_derived_rules_from_timings(machine, monkeypatch, tmp_path):
    monkeypatch.delenv(ATTENTION.env_var, raising=False)
    machine("GenuineIntel", "AVX512", 2)  # not in the built-in table: sdpa / torch first before calibrating
    assert cpu_rules.cpu_rule("attention").windows == {}
    timer = fake_timer(lambda case: attention_rule_case(case) if case.op == "attention" else linear_rule_case(case))
    rules = calibrate(timer=timer)  # to $SOFTVQ_FAST_CACHE_DIR/cpu_rules.json
    kv_lengths = sorted({case.features["kv_len"] for case in timer.seen if case.op == "attention"})
    assert kv_lengths[0] <= 8 and kv_lengths[-1] >= 2048 and {32, 64, 128, 321, 1089} <= set(kv_lengths)
    assert {(case.dtype, case.needs_grad) for case in timer.seen if case.op == "attention"} == {
        (dtype, grad) for dtype in (torch.float32, torch.bfloat16) for grad in (False, True)}
    inf = math.inf
    assert rules["attention"].windows == {
        (torch.float32, False): {"kv_len": (0.0, 128.0)},
        (torch.float32, True): {"kv_len": (64.0, 1089.0)},
        (torch.bfloat16, False): {"kv_len": (0.0, inf)},
    }
    # with gradients, the smallest won case above the largest lost one with 384 input features:
    # the tokenizer's 384 x 384 projection on 1284 rows (SiT-B's adaLN, 16 x 768 x 4608, is lost)
    assert rules["linear"].windows == {(torch.float32, False): {"in_features": (256.0, inf), "macs": (2.0**20, inf)},
                                       (torch.float32, True): {"in_features": (384.0, inf), "macs": (1284 * 384 * 384, inf)}}
    assert {case.needs_grad for case in timer.seen if case.op == "linear"} == {False, True}
    # auto follows the calibration from the next call on
    assert cpu_rules.cpu_rule("attention").windows == rules["attention"].windows
    assert cpu_rules.cpu_rule("attention").source.startswith(f"calibration file {tmp_path / 'cpu_rules.json'}")
    assert _auto(torch.float32, 128) == OURS and _auto(torch.float32, 129) == "sdpa"
    assert _auto(torch.float32, 63, True) == "sdpa" and _auto(torch.float32, 64, True) == OURS
    assert _auto(torch.bfloat16, 4096) == OURS and _auto(torch.bfloat16, 32, True) == "sdpa"


@needs_onednn
def test_linear_training_cases_time_forward_and_backward(monkeypatch):
    """A forward+backward case runs each backend's forward and its backward (the gradients of x,
    weight and bias), the oneDNN one through the training op."""
    import softvq_fast.ops.linear as linear_op

    calls = []
    original = linear_op._onednn_grad_weight
    monkeypatch.setattr(linear_op, "_onednn_grad_weight", lambda *args: calls.append(1) or original(*args))
    case = next(case for case in calibration.PLANS["linear"].cases(True) if case.needs_grad)
    runs = calibration.PLANS["linear"].calls(case)
    rows, in_features, out_features = case.shape
    for name in ("torch", "onednn"):
        grads = runs[name]()
        assert [g.shape for g in grads] == [(rows, in_features), (out_features, in_features), (out_features,)]
    assert calls == [1]
    forward = next(case for case in calibration.PLANS["linear"].cases(True) if not case.needs_grad)
    assert calibration.PLANS["linear"].calls(forward)["onednn"]().shape == (forward.shape[0], forward.shape[2])


def test_derive_window_takes_the_largest_loss_free_window():
    def points(wins):
        return [({"kv_len": kv}, won) for kv, won in wins]

    both = frozenset({"kv_len"})
    assert derive_window(points([(8, True), (64, True), (321, False), (1089, True)]), both) == {"kv_len": (0.0, 64.0)}
    assert derive_window(points([(8, False), (64, True), (321, True), (1089, True)]), both) == {
        "kv_len": (64.0, math.inf)}
    assert derive_window(points([(8, False), (64, False)]), both) is None
    # with no upper bound, a loss above every win leaves only the wins above it
    lower_only = derive_window([({"macs": m}, won) for m, won in [(1, False), (4, True), (16, False), (64, True)]],
                               frozenset())
    assert lower_only == {"macs": (64.0, math.inf)}
    # a win with a loss above it and no upper bound allowed: no window of wins alone
    assert derive_window([({"macs": m}, won) for m, won in [(1, False), (4, True), (16, False)]], frozenset()) is None


def test_file_round_trip_and_format(machine, tmp_path):
    machine(*ZEN4)
    path = tmp_path / "rules.json"
    rules = calibrate(["attention"], timer=fake_timer(attention_rule_case), path=path)
    content = json.loads(path.read_text())
    key = cpu_rules.calibration_key(2)
    assert content["format"] == 1 and list(content["machines"]) == [key]
    saved = content["machines"][key]["rules"]["attention"]
    assert saved == {"first": "softvq", "windows": {
        "float32 forward": {"kv_len": [0.0, 128.0]},
        "float32 forward+backward": {"kv_len": [64.0, 1089.0]},
        "bfloat16 forward": {"kv_len": [0.0, None]},
    }}
    parsed = cpu_rules.CpuRule.from_json("attention", saved, "x")
    assert parsed.windows == rules["attention"].windows
    # a second machine's entry is kept beside this one
    cpu_rules.write_calibration({"linear": parsed}, "other|key", path)
    assert sorted(json.loads(path.read_text())["machines"]) == sorted([key, "other|key"])


def _write_entry(path, key, rule_json):
    path.write_text(json.dumps({"format": 1, "machines": {key: {"rules": {"attention": rule_json}}}}))


SDPA_EVERYWHERE = {"first": "softvq", "windows": {}}


@pytest.mark.parametrize("mismatch", ["threads", "torch", "model", "isa"])
def test_an_entry_for_another_machine_key_is_ignored(machine, monkeypatch, tmp_path, mismatch):
    machine(*ZEN4)
    key = cpu_rules.calibration_key(2)
    other = {"threads": cpu_rules.calibration_key(4),
             "torch": key.replace(f"torch={torch.__version__}", "torch=2.0.0"),
             "model": "Other CPU" + key[len(cpu_rules.MACHINE.model):],
             "isa": key.replace("|AVX512|", "|AVX2|")}[mismatch]
    assert other != key
    _write_entry(tmp_path / "cpu_rules.json", other, SDPA_EVERYWHERE)
    cpu_rules.reload()
    assert cpu_rules.cpu_rule("attention").source.startswith("built-in table")
    _write_entry(tmp_path / "cpu_rules.json", key, SDPA_EVERYWHERE)
    cpu_rules.reload()
    assert cpu_rules.cpu_rule("attention").windows == {}
    assert cpu_rules.cpu_rule("attention").source.startswith("calibration file")
    assert cpu_rules.cpu_rule("linear").source.startswith("built-in table")  # the entry has no linear rule


def test_environment_switch_ignores_the_file(machine, monkeypatch, tmp_path):
    monkeypatch.delenv(ATTENTION.env_var, raising=False)
    machine(*ZEN4)
    _write_entry(tmp_path / "cpu_rules.json", cpu_rules.calibration_key(2), SDPA_EVERYWHERE)
    cpu_rules.reload()
    assert _auto(torch.float32, 64) == "sdpa"
    monkeypatch.setenv("SOFTVQ_FAST_CPU_RULES", "builtin")
    cpu_rules.reload()
    assert _auto(torch.float32, 64) == OURS and cpu_rules.cpu_rule("attention").source.startswith("built-in table")
    monkeypatch.setenv("SOFTVQ_FAST_CPU_RULES", "none")
    cpu_rules.reload()
    with pytest.raises(ValueError, match=r"SOFTVQ_FAST_CPU_RULES must be one of \('auto', 'builtin'\), got 'none'"):
        cpu_rules.cpu_rule("attention")


def test_a_corrupt_file_warns_and_falls_back_to_the_built_in_table(machine, tmp_path):
    machine(*ZEN4)
    (tmp_path / "cpu_rules.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match=r"cpu_rules.json cannot be read .*run `softvq-fast calibrate` again"):
        cpu_rules.reload()
    assert cpu_rules.cpu_rule("attention").source.startswith("built-in table")
    (tmp_path / "cpu_rules.json").write_text("[1, 2]")
    with pytest.warns(RuntimeWarning, match="is not in format 1"):
        cpu_rules.reload()
    (tmp_path / "cpu_rules.json").write_text(json.dumps({"format": 1, "machines": {
        cpu_rules.calibration_key(2): {"rules": {"attention": {"first": "softvq", "windows": {"float33 forward": {}}}}}}}))
    cpu_rules.reload()
    with pytest.raises(ValueError, match="malformed attention rule"):
        cpu_rules.cpu_rule("attention")


def test_machine_detection_reads_vendor_model_and_amx(monkeypatch):
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n" * 2
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_rules.detect_machine(text) == ("GenuineIntel", "Intel(R) Xeon(R) Processor", "AVX512+AMX")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # API gone: no AMX
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_rules.detect_machine("vendor_id : AuthenticAMD\n").isa == "AVX2"
    assert cpu_rules.detect_machine("").vendor == ""


def test_built_in_table_is_keyed_by_what_was_measured():
    assert set(cpu_rules.BUILTIN_RULES) == {("AuthenticAMD", "AVX512", 2), ("GenuineIntel", "AVX512+AMX", 2)}
    for entry in cpu_rules.BUILTIN_RULES.values():
        for op in ("attention", "linear"):
            if op in entry:
                cpu_rules.CpuRule.from_json(op, entry[op], "built-in")  # parses


def test_calibrate_command_and_env_report(machine, monkeypatch, tmp_path, capsys):
    machine(*ZEN4)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"calibration file: {tmp_path / 'cpu_rules.json'}: not written (run `softvq-fast calibrate`" in out
    assert "entries" not in out
    monkeypatch.setattr(calibration, "round_robin_timer", lambda **kwargs: fake_timer(linear_rule_case))
    assert cli.main(["calibrate", "--ops", "linear", "--quick"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'cpu_rules.json'}" in out
    assert "linear: onednn first where float32 forward: 256 <= in_features <= inf" in out
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"calibration file: {tmp_path / 'cpu_rules.json'}: 1 entries, an entry for" in out
    assert "linear: onednn first where" in out and f"(calibration file {tmp_path / 'cpu_rules.json'}" in out
    assert "attention: softvq first where" in out and "(built-in table, measured on an AMD EPYC" in out
    machine("GenuineIntel", "AVX2", 4)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "attention: sdpa first (not measured on GenuineIntel AVX2 at 4 threads)" in out
    assert "linear: torch first (not measured on GenuineIntel AVX2 at 4 threads)" in out


@pytest.mark.slow
def test_quick_calibration_with_the_real_timer(machine, tmp_path):
    """Smoke check of the timing path: every op gets a rule (what it says depends on the load)."""
    machine(*ZEN4)
    rules = calibrate(quick=True, path=tmp_path / "rules.json")
    assert set(rules) == {"attention", "linear"} and all(r.first for r in rules.values())
