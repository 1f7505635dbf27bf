"""The language-model job (lm/lm_job.py) on the driver: what it refuses before anything starts, where it builds."""

from pathlib import Path

import pytest
from plait.parallel.plan import PlanError
from plait.runtime.config import ConfigError
from plait.runtime.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
GPT_DP2 = ROOT / "examples" / "gpt_dp2.toml"


def test_a_plan_for_another_number_of_ranks_names_the_rank_count_first():
    """plan.dp=3 on 2 ranks: the rank count is the mistake, not train.global_batch=16 not dividing by 3."""
    spec = load_spec(GPT_DP2, ["plan.dp=3"])
    with pytest.raises(PlanError, match=r"dp\*tp\*pp = 3\*1\*1 = 3 but the job has 2 ranks: make the product equal "
                                        r"workers.num; a plan that works: dp=2"):
        spec.module.validate(spec.config, spec.workers.num)


def test_an_unknown_hf_family_is_refused_with_the_known_ones(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    spec = load_spec(GPT_DP2, [f"model.path={tmp_path / 'gpt2'}"])
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' .* has no Plait model spec; known Hugging Face "
                                          r"model types: gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3, "
                                          r"qwen3_moe"):
        spec.module.validate(spec.config, spec.workers.num)


def test_a_relative_data_path_under_a_ray_job_is_built_under_the_run_root_and_said(tmp_path, inside_a_ray_job,
                                                                                   capsys):
    spec = load_spec(GPT_DP2, ["data.path=data/tokens", "data.num_tokens=4096", "train.seq_len=32",
                               "model.max_seq_len=32"])
    spec.module.prepare(spec.config, tmp_path / "run")
    out = capsys.readouterr().out
    assert spec.config.data.path == str(tmp_path / "runs-root" / "data" / "tokens")
    assert "data.path='data/tokens' is relative" in out and (tmp_path / "runs-root" / "data" / "tokens").is_dir()
    assert not (inside_a_ray_job / "data").exists()  # nothing inside Ray's copy, which Ray deletes


def test_resuming_with_another_number_of_steps_needs_reschedule():
    from plait.runtime.trainer import check_reschedule

    assert check_reschedule(100, 100, False) == "" and check_reschedule(None, 7, False) == ""
    with pytest.raises(ValueError, match=r"train.steps=200 but the checkpoint belongs to a run of 100: the "
                                         r"learning-rate schedule .* add train.reschedule=true"):
        check_reschedule(100, 200, False)
    assert "now decays to step 200" in check_reschedule(100, 200, True)


def test_a_checkpoint_of_another_schedule_or_batch_is_refused_on_the_driver(capsys):
    from plait.runtime.driver_log import DriverLog

    meta = {"step": 4, "total_steps": 4, "data": {"global_batch": 16}}
    spec = load_spec(GPT_DP2, ["train.steps=8"])
    with pytest.raises(ValueError, match=r"train.steps=8 but the checkpoint belongs to a run of 4: .*"
                                         r"train.reschedule=true"):
        spec.module.check_resume(spec.config, meta)
    with DriverLog():
        load_spec(GPT_DP2, ["train.steps=8", "train.reschedule=true"]).module.check_resume(
            load_spec(GPT_DP2, ["train.steps=8", "train.reschedule=true"]).config, meta)
    assert "continuing a 4-step run as a 8-step run; the learning-rate schedule now decays to step 8" in \
        capsys.readouterr().out
    spec = load_spec(GPT_DP2, ["train.steps=4", "train.global_batch=8"])
    with pytest.raises(ValueError, match="train.global_batch=16, this run asks for 8"):
        spec.module.check_resume(spec.config, meta)


def test_a_spec_naming_the_old_gpt_or_hf_job_is_told_the_new_name():
    from plait.runtime.spec import spec_from_table

    for old in ("plait.parallel.gpt_job", "plait.parallel.hf_job"):
        with pytest.raises(ConfigError, match=rf"job = '{old}' is now 'plait.lm.lm_job'.*job = \"plait.lm.lm_job\""):
            spec_from_table({"job": old})
