"""Config errors name the key and the fix (the messages the README documents)."""

import subprocess
import sys

import pytest
from plait.parallel.plan import ParallelPlan, PlanError
from plait.runtime.cli import main
from plait.runtime.config import ConfigError
from plait.runtime.spec import load_spec, spec_from_table

BASE = {"job": "plait.lm.lm_job"}


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes'. Did you mean 'steps'\?"):
        spec_from_table({**BASE, "train": {"stpes": 10}})
    with pytest.raises(ConfigError, match=r"unknown key 'modle'. Did you mean 'model'\?"):
        spec_from_table({**BASE, "modle": {}})


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"'train.steps' must be int, got str 'ten'"):
        spec_from_table({**BASE, "train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"'workers.num' must be int, got bool True"):
        spec_from_table({**BASE, "workers": {"num": True}})
    spec = spec_from_table({**BASE, "train": {"optim": {"lr": 1}}})  # ints widen to floats
    assert spec.config.train.optim.lr == 1.0


def test_missing_spec_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"spec file 'nope.toml' not found"):
        load_spec("nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("job = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_spec(bad)


def test_bad_job_module_and_missing_job():
    with pytest.raises(ConfigError, match=r"missing key 'job'"):
        spec_from_table({"train": {}})
    with pytest.raises(ConfigError, match=r"job = 'plait.nope': cannot import it"):
        spec_from_table({"job": "plait.nope"})


def test_overrides_apply_with_toml_values(tmp_path):
    spec = load_spec("examples/gpt_dp2.toml", ["train.steps=7", "plan.engine=fsdp2", "train.optim.lr=0.5"])
    assert spec.config.train.steps == 7 and spec.config.plan.engine == "fsdp2"
    assert spec.config.train.optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"override 'train.steps' must look like section.key=value"):
        load_spec("examples/gpt_dp2.toml", ["train.steps"])


def test_values_checked_when_parsed():
    with pytest.raises(ConfigError, match=r"plan.engine='zero4' is not one of: ddp, fsdp2, zero1, zero2, zero3"):
        spec_from_table({**BASE, "plan": {"engine": "zero4"}})
    with pytest.raises(ConfigError, match=r"workers.strategy='PAKC': choose one of PACK"):
        spec_from_table({**BASE, "workers": {"strategy": "PAKC"}})
    with pytest.raises(ConfigError, match=r"workers.stop_grace_s=0.0: must be > 0 seconds \(how long the ranks get"):
        spec_from_table({**BASE, "workers": {"stop_grace_s": 0}})
    spec = spec_from_table({**BASE, "train": {"global_batch": 15}, "plan": {"dp": 2}})
    with pytest.raises(ValueError, match=r"train.global_batch=15 must divide evenly over plan.dp=2"):
        spec.module.validate(spec.config, 2)  # after the rank count (lm_job.validate): that is checked first


def test_plan_world_mismatch_suggests_a_plan_that_works():
    from plait.models.gpt import GPTConfig

    with pytest.raises(PlanError, match=r"dp\*tp\*pp = 2\*2\*1 = 4 but the job has 2 ranks.*dp=1,tp=2,pp=1"):
        ParallelPlan(dp=2, tp=2, engine="fsdp2").validate(2, GPTConfig())


def test_plan_errors_name_the_world_size_the_caller_knows():
    from plait.models.gpt import GPTConfig

    plan = ParallelPlan(dp=4)
    with pytest.raises(PlanError, match=r"make the product equal world_size; a plan that works: dp=2") as python_api:
        plan.validate(2, GPTConfig())
    assert "workers.num" not in str(python_api.value)
    with pytest.raises(PlanError, match=r"make the product equal workers.num"):  # what a job spec passes
        plan.validate(2, GPTConfig(), world_name="workers.num")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp="2"), r"plan.dp must be int, got str '2'"),
    (dict(tp=True), r"plan.tp must be int, got bool True"),
    (dict(microbatches=2.0), r"plan.microbatches must be int, got float 2.0"),
    (dict(sequence_parallel=1), r"plan.sequence_parallel must be bool, got int 1"),
    (dict(engine=None), r"plan.engine must be str, got NoneType None"),
])
def test_plan_field_of_the_wrong_type_is_named_when_the_plan_is_made(kwargs, message):
    with pytest.raises(PlanError, match=message):
        ParallelPlan(**kwargs)
    plan = ParallelPlan()
    for name, value in kwargs.items():  # a plan changed after it was made is checked again
        setattr(plan, name, value)
    with pytest.raises(PlanError, match=message):
        plan.validate(1)


def test_a_model_of_your_own_gets_data_parallel_plans_only():
    ParallelPlan(dp=2, engine="fsdp2").validate(2)  # no model config: any nn.Module, dp only
    with pytest.raises(PlanError, match=r"plan.tp=2, plan.pp=1: .*use data parallelism only.*dp=2"):
        ParallelPlan(tp=2).validate(2)


def test_bf16_is_accepted_by_every_engine_and_refused_for_a_float64_model():
    from plait.models.gpt import GPTConfig

    for kwargs in (dict(), dict(dp=2), dict(tp=2, engine="fsdp2"), dict(pp=2, microbatches=2),
                   dict(dp=2, engine="fsdp2"), dict(dp=2, engine="zero2")):
        plan = ParallelPlan(mixed_precision="bf16", **kwargs)
        plan.validate(plan.world_size, GPTConfig(), model_dtype="float32")
    with pytest.raises(PlanError, match=r"mixed_precision='bf16' .* the model is float64: build it in float32"):
        ParallelPlan(dp=2, mixed_precision="bf16").validate(2, GPTConfig(), model_dtype="float64")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp=2, tp=2, engine="ddp"), r"engine='ddp' with tp=2: DDP .* Use engine='fsdp2'"),
    (dict(dp=2, pp=2, engine="ddp", microbatches=2), r"engine='ddp' with pp=2: .*Use engine='fsdp2'"),
    (dict(dp=2, pp=2, engine="zero2", microbatches=2), r"ZeRO-2 and ZeRO-3 are incompatible with pipeline"),
    (dict(dp=2, tp=2, engine="zero3"), r"engine='zero3' with tp=2: .*Use engine='fsdp2'"),
    (dict(pp=2, schedule="GPipe", virtual_stages=2, microbatches=2), r"GPipe runs exactly one stage per rank"),
    (dict(pp=4, schedule="1F1B", microbatches=2), r"1F1B needs microbatches >= stages \(4\)"),
    (dict(pp=2, schedule="DualPipeV", virtual_stages=2, microbatches=2), r"DualPipeV needs microbatches >= stages"),
    (dict(pp=4, engine="fsdp2", microbatches=4, virtual_stages=2), r"n_layers=4 does not divide into .* = 8"),
    (dict(tp=4, engine="fsdp2"), r"model.n_heads=6 is not divisible by plan.tp=4"),
    (dict(dp=4, microbatches=0), r"plan.microbatches=0: must be >= 1"),
    (dict(dp=4, sequence_parallel=True), r"need plan.tp > 1"),
])
def test_each_plan_violation_names_its_constraint(kwargs, message):
    from plait.models.gpt import GPTConfig

    cfg = GPTConfig(d_model=96, n_heads=6, n_layers=4)
    plan = ParallelPlan(**kwargs)
    with pytest.raises(PlanError, match=message):
        plan.validate(plan.world_size, cfg)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["run", "examples/gpt_dp2.toml", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "plait: config error: unknown key 'train.stpes'. Did you mean 'steps'?" in err


def test_impossible_plan_is_refused_on_the_driver_before_ray_starts(capsys, tmp_path):
    run_dir = tmp_path / "never"
    assert main(["run", "examples/gpt_dp2.toml", "plan.tp=2", f"run_dir={run_dir}"]) == 2
    assert "dp*tp*pp = 2*2*1 = 4 but the job has 2 ranks" in capsys.readouterr().err
    assert not run_dir.exists()  # nothing was started or written


def test_plan_estimate_command_prints_the_per_rank_table(capsys):
    assert main(["plan", "estimate", "examples/gpt_tp2_dp2.toml", "--plan", "dp=1,tp=2,pp=2,microbatches=4"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "activations" in out and "peak: rank" in out


def test_module_entry_point_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "plait.runtime", "run", "missing.toml"], capture_output=True, text=True)
    assert out.returncode == 2 and "spec file 'missing.toml' not found" in out.stderr


@pytest.mark.parametrize("kwargs, message", [
    (dict(cp=2, pp=2, engine="fsdp2", microbatches=2), r"plan.cp=2 with plan.pp=2: context parallelism does not "
                                                       r"combine with pipeline stages .*use pp=1, e.g. dp=2,cp=2,tp=1"),
    (dict(cp=2, engine="zero2"), r"engine='zero2' with cp=2: .*Use engine='fsdp2'"),
    (dict(cp=2, tp=2, engine="ddp"), r"engine='ddp' with tp=2: DDP .* Use engine='fsdp2'"),
    (dict(cp=0), r"plan.cp=0: must be >= 1"),
])
def test_each_context_parallel_violation_names_its_constraint(kwargs, message):
    from plait.models.gpt import GPTConfig

    plan = ParallelPlan(**kwargs)
    with pytest.raises(PlanError, match=message):
        plan.validate(plan.world_size, GPTConfig())


def test_context_parallel_needs_plaits_gpt_a_divisible_length_and_the_world_it_names():
    from plait.models.gpt import GPTConfig

    with pytest.raises(PlanError, match=r"plan.cp=2: context parallelism replaces a decoder's attention .*"
                                        r"no model shape was given"):
        ParallelPlan(cp=2).validate(2)
    with pytest.raises(PlanError, match=r"seq_len=12 is not divisible by 2\*plan.cp = 8: .*use seq_len=8 or 16"):
        ParallelPlan(cp=4).validate(4, GPTConfig(), seq_len=12)
    ParallelPlan(cp=4).validate(4, GPTConfig(), seq_len=16)
    with pytest.raises(PlanError, match=r"dp\*cp\*tp\*pp = 2\*2\*1\*1 = 4 but the job has 2 ranks: .*"
                                        r"a plan that works: dp=1,tp=1,pp=1,cp=2"):
        ParallelPlan(dp=2, cp=2, engine="fsdp2").validate(2, GPTConfig())
    with pytest.raises(ConfigError, match=r"'plan.cp' must be int, got str '2'"):
        spec_from_table({**BASE, "plan": {"cp": "2"}})


def test_plan_estimate_splits_the_sequence_over_cp_and_refuses_an_indivisible_one(capsys):
    assert main(["plan", "estimate", "examples/gpt_cp2_dp2.toml"]) == 0
    out = capsys.readouterr().out
    assert "dp2(fsdp2) cp2 tp1 pp1" in out and "128 tokens of each per cp rank" in out
    assert main(["plan", "estimate", "examples/gpt_cp2_dp2.toml", "train.seq_len=254"]) == 2
    assert "seq_len=254 is not divisible by 2*plan.cp = 4" in capsys.readouterr().err


def test_a_spec_without_workers_num_runs_the_ranks_its_plan_declares(tmp_path):
    table = {"job": "plait.lm.lm_job", "plan": {"dp": 2, "tp": 2}}
    assert spec_from_table(table).workers.num == 4  # no [workers]: dp x tp ranks
    assert spec_from_table({**table, "workers": {"cpus_per_worker": 2}}).workers.num == 4
    assert spec_from_table({**table, "workers": {"num": 2}}).workers.num == 2  # said: kept (validate refuses it)
    rl = tmp_path / "rl.toml"
    rl.write_text('job = "plait.rl.rl_job"\n[plan]\ndp = 1\n')
    assert load_spec(rl).workers.num == 1 and load_spec(rl, ["plan.dp=2"]).workers.num == 2
