"""Your own data, as people bring it: a `datasets` dataset (a save_to_disk directory, parquet, JSON, or a hub name),
GSM8K's question / "... #### 72" format, a separate --eval_data set, and one line for every bad input. The datasets
are written to disk by the tests with `datasets` itself: nothing is downloaded."""

import json

import pytest

import grpo_mini as g
import tasks
from conftest import TINY_RUN_FLAGS, run_script

datasets = pytest.importorskip("datasets")

GSM8K_LIKE = {  # GSM8K's columns and answer format: worked text, then "#### <number>"
    "train": [{"question": f"Ava has {i} apples and buys {i + 2} more. How many apples does she have?",
               "answer": f"She has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
              for i in range(1, 21)],
    "test": [{"question": f"Ben has {i} pens and loses 1. How many pens are left?",
              "answer": f"{i} - 1 = {i - 1}\n#### {i - 1:,}"} for i in range(1001, 1009)],
}


@pytest.fixture
def gsm8k_dir(tmp_path):
    path = tmp_path / "gsm8k"
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in GSM8K_LIKE.items()}
                         ).save_to_disk(str(path))
    return path


def gsm8k_config(path, **overrides):
    return g.Config(data=str(path), prompt_column="question", num_eval_problems=4, seed=0, **overrides)


def test_gsm8k_format_from_a_saved_dataset_dict_with_a_separate_eval_split(gsm8k_dir):
    train, held_out = g.build_task(gsm8k_config(gsm8k_dir, eval_data=str(gsm8k_dir)))
    assert len(train) == 20 and train[0].answer == 4.0 and train[0].prompt.startswith("Ava has 1 apples")
    assert len(held_out) == 4 and {p.answer for p in held_out} <= {float(i - 1) for i in range(1001, 1009)}
    assert train[0].source == f"{gsm8k_dir}[0]"
    train_only, split_off = g.build_task(gsm8k_config(gsm8k_dir))  # no --eval_data: rows held out of --data
    assert len(split_off) == 4 and len(train_only) == 16


def test_parquet_json_and_jsonl_files_read_the_same_rows(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.parquet", "d.json", "d.jsonl"):
        problems = tasks.load_problems(str(tmp_path / name), "train", "prompt", "answer")
        assert [(p.prompt, p.answer) for p in problems] == [(r["prompt"], float(r["answer"])) for r in rows], name


def test_bad_data_is_one_line_naming_the_dataset(gsm8k_dir, tmp_path, monkeypatch):
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):  # the hub is never reached here: fail at once
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    with pytest.raises(g.ConfigError, match=rf"--data {gsm8k_dir}: no column 'prompt' \(it has question, answer\); "
                                            r"choose with --prompt_column"):
        g.build_task(g.Config(data=str(gsm8k_dir)))
    with pytest.raises(g.ConfigError, match=rf"--eval_data {gsm8k_dir}: no split 'validation' \(it has train, "
                                            r"test\); choose one with --eval_data_split"):
        g.build_task(gsm8k_config(gsm8k_dir, eval_data=str(gsm8k_dir), eval_data_split="validation"))
    with pytest.raises(g.ConfigError, match=r"the same split \(train\) as --data"):
        gsm8k_config(gsm8k_dir, eval_data=str(gsm8k_dir), eval_data_split="train").validate()
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{"prompt": "a?", "answer": "no number"}, {"prompt": "b?", "answer": "2"}]
                               ).save_to_disk(str(bad))
    with pytest.raises(g.ConfigError, match=rf"{bad}\[0\]: \"answer\" has no number in it"):
        g.build_task(g.Config(data=str(bad)))
    with pytest.raises(g.ConfigError, match="--data nowhere/at/all.parquet: no such file"):
        g.build_task(g.Config(data="nowhere/at/all.parquet"))
    with pytest.raises(g.ConfigError, match=r"--data openai/gsm8k: could not load it \("):  # offline here
        g.build_task(g.Config(data="openai/gsm8k", data_config="main"))


def test_the_gsm8k_path_trains_end_to_end_offline(gsm8k_dir, tiny_model_dir, tmp_path):
    cfg = gsm8k_config(gsm8k_dir, eval_data=str(gsm8k_dir), model=str(tiny_model_dir), output_dir=str(tmp_path / "r"),
                       max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=8, eval_every=0,
                       device="cpu", dtype="fp32", save_every=0, save_model=False)
    summary = g.train(cfg)
    assert summary["steps"] == 2 and len(summary["eval_after"]["completions"]) == 4
    result = run_script("grpo_mini.py", "--model", tiny_model_dir, "--data", gsm8k_dir, "--prompt_column", "question",
                        "--eval_data", gsm8k_dir, "--output_dir", tmp_path / "cli", *TINY_RUN_FLAGS,
                        "--num_generations", "2", "--max_steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out accuracy:" in result.stdout
