"""FP8 training (`parallel.float8`, #27 item 1) where it can be specified on a CPU: a run that cannot use it is
refused in one line before anything is written, and FP8 changes no weight, name or checkpoint: an FP8 run and a
bf16 run resume each other's checkpoints. (The FP8 step itself needs FP8 tensor cores: BENCHMARKS.md.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from genesis.config import ParallelConfig, load_model_config
from genesis.errors import ConfigError
from genesis_model.model import Transformer
from genesis_model.parallelize import apply_compile, apply_float8, plan_parallel

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_float8_on_the_cpu_is_refused_in_one_line_naming_the_setting(recipe):
    with pytest.raises(ConfigError) as err:
        plan_parallel(ParallelConfig(float8=recipe), 1, "cpu")
    line = str(err.value)
    assert "\n" not in line and f"parallel.float8={recipe}" in line and "set parallel.float8=off" in line


def test_float8_is_refused_beside_master_weights_or_fp32_compute():
    with pytest.raises(ConfigError, match="set parallel.master_weights=false"):
        plan_parallel(ParallelConfig(float8="rowwise", master_weights=True), 1, "cuda")
    with pytest.raises(ConfigError, match="set parallel.param_dtype=bfloat16"):
        plan_parallel(ParallelConfig(float8="rowwise", param_dtype="float32"), 1, "cuda")
    assert plan_parallel(ParallelConfig(), 1, "cpu").float8 == "off"


def test_float8_off_reads_as_off_from_yaml_and_from_the_command_line(tmp_path):
    # YAML 1.1 reads a bare `off` as false: `float8: off` in a config file and `parallel.float8=off` on the
    # command line are what a user writes, and both mean the setting's 'off'.
    from genesis.config import TrainConfig, load_config

    path = tmp_path / "train.yaml"
    path.write_text("model: tiny\ndata_dir: d\nrun_dir: r\nmax_steps: 10\nparallel:\n  float8: off\n")
    assert load_config(TrainConfig, path).parallel.float8 == "off"
    assert load_config(TrainConfig, path, ["parallel.float8=off"]).parallel.float8 == "off"
    with pytest.raises(ConfigError, match="parallel.float8"):
        load_config(TrainConfig, path, ["parallel.float8=on"])


def test_genesis_train_refuses_float8_on_the_cpu_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", "--config", str(REPO / "configs/train/tiny-cpu.yaml"),
         f"run_dir={run_dir}", f"data_dir={tmp_path / 'no-data'}", "parallel.float8=rowwise"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and "parallel.float8=rowwise" in lines[-1], result.stderr[-2000:]
    assert not run_dir.exists()


def tiny_model(seed: int) -> Transformer:
    model = Transformer(load_model_config("tiny"))
    model.init_weights(seed=seed)
    return model


def test_float8_layers_keep_every_weight_name_shape_and_dtype_and_leave_the_output_projection_alone():
    from torchao.float8.float8_linear import Float8Linear

    plain, fp8 = tiny_model(0), tiny_model(0)
    apply_float8(fp8, "rowwise", fsdp=False)
    converted = [name for name, module in fp8.named_modules() if isinstance(module, Float8Linear)]
    config = fp8.config
    assert len(converted) == 4 * config.n_layers  # wqkv, wo, w13, w2 of every block
    assert all(name.startswith("layers.") for name in converted)
    plain_state, fp8_state = plain.state_dict(), fp8.state_dict()
    assert list(plain_state) == list(fp8_state)
    for name, tensor in plain_state.items():
        assert fp8_state[name].shape == tensor.shape and fp8_state[name].dtype == tensor.dtype, name
        assert torch.equal(fp8_state[name], tensor), name


def test_fp8_on_one_gpu_compiles_per_block_unless_told_otherwise(monkeypatch):
    # The measured FP8 step compiles each block (BENCHMARKS "FP8 training"); one whole-model graph under FP8 did
    # not finish compiling in 150 s there, and on the small preset took minutes to its first step.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))  # an H100/H200; none here
    assert plan_parallel(ParallelConfig(float8="tensorwise"), 1, "cuda").compile_scope == "blocks"
    assert plan_parallel(ParallelConfig(float8="rowwise"), 1, "cuda").compile_scope == "blocks"
    assert plan_parallel(ParallelConfig(float8="tensorwise", compile_scope="model"), 1, "cuda").compile_scope == "model"
    assert plan_parallel(ParallelConfig(), 1, "cuda").compile_scope == "model"  # bf16 keeps its measured graph


@pytest.mark.parametrize("switch, tuned", [(None, True), ("0", False), ("1", True)])
def test_fp8_compile_tunes_its_kernels_unless_inductors_own_switch_says_otherwise(monkeypatch, switch, tuned):
    # The tuning costs minutes of first compile; TORCHINDUCTOR_COORDINATE_DESCENT_TUNING, where set, decides.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if switch is None:
        monkeypatch.delenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", switch)
    model = tiny_model(0)
    apply_float8(model, "tensorwise", fsdp=False)
    untouched = {"coordinate_descent_tuning": switch == "1", "triton.prefer_nd_tiling": False,
                 "emulate_precision_casts": False}
    with inductor_config.patch(untouched), functorch_config.patch(activation_memory_budget=1.0):
        apply_compile(model, float8=True)  # wraps the blocks; nothing compiles before a forward
        assert inductor_config.coordinate_descent_tuning is tuned
        assert inductor_config.triton.prefer_nd_tiling is True


@pytest.mark.parametrize("direction", ["float8 to bf16", "bf16 to float8"])
def test_a_checkpoint_of_an_fp8_run_and_of_a_bf16_run_load_into_each_other(tmp_path, direction):
    saved, loaded = tiny_model(1), tiny_model(2)
    apply_float8(saved if direction == "float8 to bf16" else loaded, "tensorwise", fsdp=False)
    dcp.save(saved.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    state = loaded.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    loaded.load_state_dict(state)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
