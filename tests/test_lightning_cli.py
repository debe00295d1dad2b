"""Every callback is configurable from LightningCLI: YAML, ``--trainer.callbacks+=`` and clear errors.

jsonargparse silently drops (with only a debug log) an ``__init__`` argument whose type it cannot
parse; these tests give every argument of every callback a non-default value, so a dropped one
fails loudly ("not expected") instead.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI

import lightning_sentinel
from lightning_sentinel import Sentinel, findings
from lightning_sentinel.base import SentinelCallback
from tests._models import Classifier

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

CALLBACKS: list[type[SentinelCallback]] = sorted(
    (
        getattr(lightning_sentinel, name)
        for name in lightning_sentinel.__all__
        if inspect.isclass(getattr(lightning_sentinel, name))
        and issubclass(getattr(lightning_sentinel, name), SentinelCallback)
        and getattr(lightning_sentinel, name) is not SentinelCallback
    ),
    key=lambda cls: cls.__name__,
)


def _other_value(name: str, hint: Any, default: Any) -> Any:
    """A valid value of type ``hint`` that differs from ``default``."""
    if typing.get_origin(hint) is typing.Literal:
        return next(choice for choice in reversed(typing.get_args(hint)) if choice != default)
    options = set(typing.get_args(hint)) - {type(None)} or {hint}
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if 0 < default < 1 else default * 2
    if isinstance(default, str):
        return default + "_custom"
    if float in options:
        return 2.5
    if int in options and str not in options:
        return 1
    if str in options:
        return {"target_key": "labels", "name_filter": "net"}.get(name, "features")
    if any(typing.get_origin(option) is list for option in options):
        return ["head\\..*"]
    raise AssertionError(f"no test value for {name}: {hint}")


def _full_arguments(callback: type) -> dict[str, Any]:
    hints = typing.get_type_hints(callback.__init__)
    signature = inspect.signature(callback.__init__)
    return {
        name: _other_value(name, hints[name], parameter.default)
        for name, parameter in signature.parameters.items()
        if name != "self"
    }


def test_every_public_callback_is_covered():
    names = {cls.__name__ for cls in CALLBACKS}
    assert {"NonFiniteGuard", "GradientNormMonitor", "HistogramLogger", "TargetLeakageCheck"} <= names
    assert len(CALLBACKS) >= 14
    for cls in CALLBACKS:
        assert _full_arguments(cls), cls  # every callback has arguments to configure


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(Classifier, run=False, args=args, save_config_callback=None)


def _assert_configured(cli: LightningCLI, expected: list[tuple[type, dict[str, Any]]]) -> None:
    built = [callback for callback in cli.trainer.callbacks if isinstance(callback, SentinelCallback)]
    assert [type(callback) for callback in built] == [cls for cls, _ in expected]
    parsed = cli.config["trainer"]["callbacks"]
    for callback, entry, (cls, arguments) in zip(built, parsed, expected, strict=True):
        assert dict(entry["init_args"]) == arguments, cls.__name__  # nothing dropped, nothing coerced
        for name, value in arguments.items():
            if name in vars(callback) and not name.startswith("_"):
                assert getattr(callback, name) == value, (cls.__name__, name)


def test_every_argument_of_every_callback_is_accepted_from_yaml(tmp_path):
    expected = [(cls, _full_arguments(cls)) for cls in CALLBACKS]
    config = {
        "trainer": {
            "logger": False,
            "callbacks": [
                {"class_path": f"lightning_sentinel.{cls.__name__}", "init_args": arguments}
                for cls, arguments in expected
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _assert_configured(_cli(["--config", str(path)]), expected)


def _flag(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, bool)) else str(value)


def test_every_argument_of_every_callback_is_accepted_on_the_command_line():
    expected = [(cls, _full_arguments(cls)) for cls in CALLBACKS]
    args = ["--trainer.logger=false"]
    for cls, arguments in expected:
        args.append(f"--trainer.callbacks+=lightning_sentinel.{cls.__name__}")
        args += [f"--trainer.callbacks.{name}={_flag(value)}" for name, value in arguments.items()]
    _assert_configured(_cli(args), expected)


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--trainer.callbacks.spike_factor=big", "spike_factor"),
        ("--trainer.callbacks.on_detect=explode", "on_detect"),
        ("--trainer.callbacks.no_such_argument=1", "no_such_argument"),
    ],
)
def test_a_wrong_value_gets_a_clear_jsonargparse_error(flag, named, capsys):
    with pytest.raises(SystemExit) as exited:
        _cli(["--trainer.logger=false", "--trainer.callbacks+=lightning_sentinel.GradientNormMonitor", flag])
    assert exited.value.code != 0
    error = capsys.readouterr().err
    assert named in error and "GradientNormMonitor" in error


def test_sentinel_checks_and_disable_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        """
trainer:
  logger: false
  callbacks:
    - class_path: lightning_sentinel.Sentinel
      init_args:
        preset: full
        disable: [vanishing-gradients, loss-oscillation]
        on_detect: stop
        checks:
          - class_path: lightning_sentinel.GradientNormMonitor
            init_args:
              spike_factor: 20.0
          - lightning_sentinel.LearningCurveMonitor
"""
    )
    (sentinel,) = [c for c in _cli(["--config", str(path)]).trainer.callbacks if isinstance(c, Sentinel)]
    assert [type(check).__name__ for check in sentinel.checks] == [
        "GradientNormMonitor",
        "LearningCurveMonitor",
    ]
    gradients, curves = sentinel.checks
    assert sentinel.preset == "full" and sentinel.on_detect == "stop"
    assert gradients.spike_factor == 20.0 and all(check.on_detect == "stop" for check in sentinel.checks)
    assert "vanishing-gradients" not in gradients.active_checks
    assert "loss-oscillation" not in curves.active_checks and "loss-divergence" in curves.active_checks


def test_sentinel_rejects_an_unknown_check_id_from_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown check ids"):
        _cli(["--trainer.logger=false", "--trainer.callbacks+=lightning_sentinel.Sentinel",
              "--trainer.callbacks.disable=[no-such-check]"])  # fmt: skip


# ---------------------------------------------------------------------- the example script
def _example_module():
    spec = importlib.util.spec_from_file_location("cli_train_example", EXAMPLES / "cli_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_example(tmp_path: Path, *configs: str) -> Any:
    pytest.importorskip("sklearn")
    args = ["fit"]
    for config in configs:
        args += ["--config", str(EXAMPLES / config)]
    args += [
        "--trainer.max_epochs=1",  # 23 steps
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    return _example_module().main(args)


def test_example_config_is_quiet_on_the_healthy_model(tmp_path, capfd):
    cli = _run_example(tmp_path, "sentinel.yaml")
    (sentinel,) = [c for c in cli.trainer.callbacks if isinstance(c, Sentinel)]
    assert sentinel.checks[1].spike_factor == 20.0 and "class-imbalance" in sentinel.disable
    assert findings(cli.trainer) == []
    assert "checks passed" in capfd.readouterr().err
    assert json.loads(Path(cli.trainer.log_dir, "sentinel", "findings.json").read_text()) == []


def test_example_broken_config_is_caught(tmp_path, capfd):
    cli = _run_example(tmp_path, "sentinel.yaml", "broken.yaml")
    found = {(f.check, f.severity.value) for f in findings(cli.trainer)}
    assert found == {("softmax-before-cross-entropy", "error"), ("unnormalized-inputs", "warning")}
    report = capfd.readouterr().err
    assert "2 findings" in report and "try: pass the raw logits" in report
