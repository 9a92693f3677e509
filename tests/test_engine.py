"""The DeepSpeed engine in one process: its config, skipped non-finite steps and rollback, gradient
accumulation, model-config checks, and checkpoint loading that never unpickles arbitrary objects."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from test_train import folder_batches, read_metrics, small_config
from trainer.loop.checkpoint import CheckpointError
from trainer.loop.checkpoint_load import install_safe_deepspeed_loader, load_checkpoint
from trainer.config import EngineConfig, RunConfig
from trainer.loop.process_group import init_process_group
from trainer.loop.engine import build_engine, deepspeed_config, resolve_engine_config
from cluster.data_source import train
from trainer.loop.train import train as train_on  # with a batch source of the test's own


def tiny(root, out_dir, **train_overrides) -> RunConfig:
    config = small_config(root, out_dir, **train_overrides)
    config.perceptual.backbone = "none"
    config.loss.lam_perc = 0.0
    return config


def test_deepspeed_config_follows_the_engine_section():
    config = RunConfig()
    config.data.batch_size = 16
    config.engine = EngineConfig(precision="bf16", mixed_precision="autocast", zero_stage=2,
                                 gradient_accumulation_steps=4, gradient_clipping=1.5, optimizer="deepspeed")
    ds = deepspeed_config(config.engine, config, world_size=3)
    assert ds["train_batch_size"] == 16 * 4 * 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # SPEC 5: Adam with L2 weight decay, not AdamW
    assert ds["optimizer"]["params"]["adam_w_mode"] is False and ds["optimizer"]["params"]["weight_decay"] == 5e-4
    config.engine = EngineConfig(precision="bf16", mixed_precision="deepspeed")
    ds = deepspeed_config(config.engine, config, world_size=1)
    assert ds["bf16"]["enabled"] and "torch_autocast" not in ds and "optimizer" not in ds
    with pytest.raises(ValueError, match="zero_stage = 3"):
        EngineConfig(zero_stage=3)
    # the older train.autocast_dtype still means "this precision under autocast"
    config = RunConfig()
    config.train.autocast_dtype = "bf16"
    assert resolve_engine_config(config).precision == "bf16"
    config.engine.precision = "fp16"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_engine_config(config)


@pytest.mark.parametrize("precision,mode,zero", [("fp32", "autocast", 0), ("bf16", "deepspeed", 1)])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(synthetic_root, tmp_path, precision, mode, zero):
    config = tiny(synthetic_root, tmp_path)
    config.engine.precision, config.engine.mixed_precision, config.engine.zero_stage = precision, mode, zero
    init_process_group("cpu")
    engine = build_engine(config, 1, torch.device("cpu"))
    ds = engine.engine
    from trainer.model.unsup3d import Unsup3DLoss
    from trainer.loop.checkpoint import fp32_model_state

    criterion = Unsup3DLoss(config.loss, None, config.model)
    image = torch.rand(4, 3, 64, 64) * 2 - 1

    def step(img):
        terms = criterion(img, ds(img))
        engine.watch.check_loss(terms["total"])
        ds.backward(terms["total"])
        engine.gate.skip = engine.watch.take()
        ds.step()
        engine.gate.skip = False
        return bool(torch.isfinite(terms["total"]))

    assert step(image)
    before = fp32_model_state(engine)
    moments = {k: v.clone() for k, v in engine.gate.optimizer.state[engine.gate.optimizer.param_groups[0]["params"][0]].items()}
    bad = image.clone()
    bad[0, 0, 10, 10] = float("nan")
    assert not step(bad)
    after = fp32_model_state(engine)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    state = engine.gate.optimizer.state[engine.gate.optimizer.param_groups[0]["params"][0]]
    for key, value in moments.items():
        assert torch.equal(value, state[key]), key
    assert step(image)  # and training goes on
    assert any(not torch.equal(before[k], v) for k, v in fp32_model_state(engine).items())
    ds.destroy()


class FlakyBatches:
    """Batches that deliver NaN images on the given calls of next() (a transient fault: replaying
    the same position after a rollback gives clean data)."""

    def __init__(self, inner, bad_calls: set[int]):
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    epoch = property(lambda self: self.inner.epoch)
    batches_per_epoch = property(lambda self: self.inner.batches_per_epoch)

    def __next__(self):
        self.calls += 1
        batch = next(self.inner)
        if self.calls in self.bad_calls:
            batch["image"] = torch.full_like(batch["image"], float("nan"))
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_non_finite_steps_are_skipped_counted_and_rolled_back(synthetic_root, tmp_path, caplog):
    config = tiny(synthetic_root, tmp_path / "run", max_steps=10, checkpoint_every=3, log_every=1)
    config.engine.max_nonfinite_steps = 2
    data = FlakyBatches(folder_batches(synthetic_root, 8), bad_calls={2, 8, 9})
    with caplog.at_level(logging.WARNING, logger="trainer.loop.train"):
        result = train_on(config, data)
    data.inner.close()
    assert result.steps == 10
    records = read_metrics(tmp_path / "run")
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    assert by_step[2][0]["skipped_steps"] == 1  # step 2 skipped and counted, no rollback for one
    assert by_step[8][0]["skipped_steps"] == 2
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert rollbacks == [{"event": "rollback", "from_step": 9, "step": 6, "checkpoint": "step_00000006"}]
    assert "rolling back to step_00000006" in caplog.text
    # after the rollback, steps 7..10 ran again on clean data
    assert [r["step"] for r in records if "total" in r][-4:] == [7, 8, 9, 10]
    final = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert final["step"] == 10 and final["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in final["model"].values())


def test_persistent_non_finite_steps_stop_the_run(synthetic_root, tmp_path):
    from trainer.loop.train import NonFiniteTraining

    config = tiny(synthetic_root, tmp_path / "run", max_steps=6, checkpoint_every=2)
    config.engine.max_nonfinite_steps = 2
    with pytest.raises(NonFiniteTraining, match="no checkpoint to roll back to"):
        train_on(config, FlakyBatches(folder_batches(synthetic_root, 8), bad_calls={1, 2}))


def test_gradient_accumulation_consumes_micro_batches(synthetic_root, tmp_path):
    config = tiny(synthetic_root, tmp_path / "run", max_steps=3)
    config.data.batch_size = 4
    config.engine.gradient_accumulation_steps = 2
    config.engine.gradient_clipping = 1.0
    config.engine.zero_stage = 1  # ZeRO reports the global gradient norm
    train(config)
    state = load_checkpoint(tmp_path / "run" / "checkpoints")
    # 3 steps of 2 micro-batches of 4 read 24 samples: the stream's position, 96 samples in 8 shards of 12
    assert state["data"]["epoch"] == 0 and state["data"]["cursor"] * 12 + state["data"]["offset"] == 3 * 2 * 4
    assert json.loads(state["engine"])["gradient_accumulation_steps"] == 2
    assert "grad_norm" in read_metrics(tmp_path / "run")[-1]


def test_model_config_override_and_tampered_files(synthetic_root, tmp_path):
    train(tiny(synthetic_root, tmp_path / "run", max_steps=1))
    changed = tiny(synthetic_root, tmp_path / "run", max_steps=2)
    changed.model.max_rotation_degrees = 30.0  # same weights, another model section
    with pytest.raises(CheckpointError, match="allow_other_model_config"):
        train(changed)
    changed.train.allow_other_model_config = True
    assert train(changed).steps == 2
    # a DeepSpeed file that is not the one recorded at save time is refused before DeepSpeed reads it
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text()
    ds_file = next((latest / "ds").rglob("*.pt"))
    ds_file.write_bytes(ds_file.read_bytes() + b"\0")
    changed.train.max_steps = 3
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(changed)


class Boom:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_deepspeed_files_are_read_without_unpickling_arbitrary_objects(tmp_path, capsys):
    from types import SimpleNamespace

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
    install_safe_deepspeed_loader(engine)
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "extra": Boom()}, evil)
    with pytest.raises(CheckpointError, match="holds pickled Python objects .* code, and will not be loaded"):
        engine.checkpoint_engine.load(str(evil), map_location="cpu")
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    fine = tmp_path / "fine.pt"
    torch.save({"module": {"w": torch.ones(2)}}, fine)
    assert torch.equal(engine.checkpoint_engine.load(str(fine))["module"]["w"], torch.ones(2))
    # our own files are weights_only too
    (tmp_path / "state.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "state.pt")


def test_a_world_of_one_skips_the_all_reduce_and_trains_to_the_same_weights(synthetic_root, tmp_path):
    """Without ZeRO, one process has nothing to reduce: the engine skips DeepSpeed's flatten, all-reduce
    and copy-back, and two steps give bit for bit the weights of DeepSpeed's own all-reduce (the
    perceptual sigma head, unused here, included: it gets a zero gradient either way)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from trainer.loop.checkpoint import fp32_model_state
    from trainer.loop.train import seed_everything
    from trainer.model.unsup3d import Unsup3DLoss

    config = tiny(synthetic_root, tmp_path)
    init_process_group("cpu")
    image = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    states = []
    for deepspeeds_own in (False, True):
        seed_everything(0)
        engine = build_engine(config, 1, torch.device("cpu"))
        assert "allreduce_gradients" in vars(engine.engine), "the world of one has its own"
        if deepspeeds_own:
            del engine.engine.allreduce_gradients
        criterion = Unsup3DLoss(config.loss, None, config.model)
        for _ in range(2):
            engine.engine.backward(criterion(image, engine.engine(image))["total"])
            engine.engine.step()
        states.append(fp32_model_state(engine))
        engine.engine.destroy()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    config.engine.zero_stage = 1
    engine = build_engine(config, 1, torch.device("cpu"))
    assert "allreduce_gradients" not in vars(engine.engine), "ZeRO moves gradients in that call: it stays"
    assert engine.engine.allreduce_gradients.__func__ is DeepSpeedEngine.allreduce_gradients
    engine.engine.destroy()
