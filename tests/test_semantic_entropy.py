"""semantic_entropy.py: estimators by hand, clustering with deterministic judges, and the NLI path offline."""

import math

import pytest
import torch

import semantic_entropy as se
from conftest import run_script


# ---------------------------------------------------------------------------------------------- estimators
def test_discrete_entropy_worked_example():
    assert se.discrete_semantic_entropy([0, 0, 0, 0, 1, 1]) == pytest.approx(0.6365, abs=1e-4)
    assert se.discrete_semantic_entropy([0, 0, 0]) == 0.0
    assert se.discrete_semantic_entropy([0]) == 0.0  # a single response: defined as 0
    assert se.discrete_semantic_entropy(list(range(8))) == pytest.approx(math.log(8))


def test_likelihood_weighted_entropy_worked_example():
    ll = [math.log(0.5), math.log(0.25), math.log(0.25)]
    assert se.semantic_entropy([0, 0, 1], ll) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert se.semantic_entropy([0, 0, 1], ll) == pytest.approx(0.5623, abs=1e-4)
    # Only relative likelihoods matter: shifting every l_i by a constant changes nothing.
    assert se.semantic_entropy([0, 0, 1], [x - 7.0 for x in ll]) == pytest.approx(0.5623, abs=1e-4)
    assert se.semantic_entropy([0, 0], [-1.0, -3.0]) == 0.0


def test_monte_carlo_entropy_worked_example():
    ll = [math.log(0.5), math.log(0.25), math.log(0.25)]
    assert se.monte_carlo_semantic_entropy([0, 0, 1], ll) == pytest.approx(
        (-math.log(0.75) - math.log(0.25)) / 2)  # 0.8370
    assert se.monte_carlo_semantic_entropy([0, 0, 1], ll) == pytest.approx(0.8370, abs=1e-4)


def test_estimators_stay_finite_for_long_answers():
    ll = [-800.0, -801.0, -805.0, -800.5]  # exp() of any of these underflows to 0 in float64
    log_p = se.cluster_log_probs([0, 1, 1, 0], ll)
    assert all(math.isfinite(x) for x in log_p)
    expected_p0 = 1 / (1 + (math.exp(-1) + math.exp(-5)) / (1 + math.exp(-0.5)))
    assert math.exp(log_p[0]) == pytest.approx(expected_p0)
    assert math.isfinite(se.semantic_entropy([0, 1, 1, 0], ll))
    assert math.isfinite(se.monte_carlo_semantic_entropy([0, 1, 1, 0], ll))
    assert se.semantic_entropy([0, 1], [-1e6, 0.0]) == pytest.approx(0.0, abs=1e-9)  # a negligible cluster


@pytest.mark.parametrize("ids, ll, message", [
    ([], [], "at least one response"),
    ([0, 1], [0.0], "2 cluster ids but 1 log-likelihoods"),
    ([0, 1], [0.0, float("nan")], "finite or -inf"),
    ([0, 1], [float("-inf"), float("-inf")], "no probability mass"),
])
def test_bad_input_gives_clear_errors(ids, ll, message):
    with pytest.raises(ValueError, match=message):
        se.semantic_entropy(ids, ll)
    if not ids:
        with pytest.raises(ValueError, match=message):
            se.discrete_semantic_entropy(ids)


def test_minus_inf_likelihood_is_a_zero_probability_answer():
    assert se.semantic_entropy([0, 1], [0.0, float("-inf")]) == 0.0


# ---------------------------------------------------------------------------------------------- clustering
def test_semantic_ids_order_of_first_appearance():
    same_first_letter = lambda a, b: a[0] == b[0]
    assert se.semantic_ids(["b1", "a1", "b2", "c", "a2"], same_first_letter) == [0, 1, 0, 2, 1]
    assert se.semantic_ids([], same_first_letter) == []


def test_semantic_ids_checks_both_directions_with_an_asymmetric_judge():
    # "a entails b" when b is a prefix of a: "Paris, France" entails "Paris", not the other way round.
    calls = []

    def prefix_entails(a, b):
        calls.append((a, b))
        return a.startswith(b)

    # The forward direction (representative -> newcomer) holds; only the backward check keeps them apart.
    assert se.semantic_ids(["Paris, France", "Paris"], prefix_entails) == [0, 1]
    assert calls == [("Paris, France", "Paris"), ("Paris", "Paris, France")]
    assert se.semantic_ids(["Paris", "Paris, France", "Paris"], prefix_entails) == [0, 1, 0]


def test_semantic_ids_compares_with_the_first_member_only():
    # Non-transitive judge: 1 ~ 2 and 2 ~ 3 but not 1 ~ 3. 3 is compared with cluster 0's first member (1) only.
    close = lambda a, b: abs(int(a) - int(b)) <= 1
    assert se.semantic_ids(["1", "2", "3"], close) == [0, 0, 1]


def test_math_judge():
    judge = se.MathAnswerJudge()
    assert judge.cluster(["It is 12.", "\\boxed{12}", "12.0", "13", "3/4", "0.75"]) == [0, 0, 0, 1, 2, 2]
    # Answer-less responses are each their own cluster, even when identical.
    assert judge.cluster(["no idea", "no idea", "7", "seven"]) == [0, 1, 2, 3]
    assert se.discrete_semantic_entropy(judge.cluster(["5"] * 8)) == 0.0


# ---------------------------------------------------------------------------------------------- NLI judge, offline
def build_tiny_nli(id2label):
    """A tiny random BERT classifier with a WordPiece pair tokenizer ([CLS] a [SEP] b [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = ["paris is the capital of france", "it is paris", "lyon", "the answer is lyon", "berlin", "what"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})
    return BertForSequenceClassification(config), fast


class RuleNLI(torch.nn.Module):
    """Runs the real tiny model, then overrides its logits with a readable rule on the decoded (premise, hypothesis):
    entailment when every hypothesis word is in the premise, contradiction when they share no word, else neutral."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.inner, self.tokenizer, self.config = model, tokenizer, model.config
        self.batches, self.pairs = [], []

    def forward(self, **enc):
        out = self.inner(**enc)
        self.batches.append(enc["input_ids"].size(0))
        index = {v.lower(): int(k) for k, v in self.config.id2label.items()}
        logits = torch.zeros_like(out.logits)
        for row, ids in enumerate(enc["input_ids"].tolist()):
            text = self.tokenizer.decode(ids, skip_special_tokens=False).replace("[PAD]", "")
            premise, hypothesis = [set(part.replace("[CLS]", "").split()) for part in text.split("[SEP]")[:2]]
            self.pairs.append((" ".join(sorted(premise)), " ".join(sorted(hypothesis))))
            label = ("entailment" if hypothesis <= premise else "contradiction" if not hypothesis & premise
                     else "neutral")
            logits[row, index[label]] = 10.0
        out.logits = logits
        return out


@pytest.fixture(params=[{0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
                        {0: "entailment", 1: "neutral", 2: "contradiction"}], ids=["deberta-order", "permuted"])
def rule_judge(request):
    model, tokenizer = build_tiny_nli(request.param)
    wrapped = RuleNLI(model, tokenizer)
    return se.NLIJudge(wrapped, tokenizer, device="cpu", batch_size=4), wrapped


def test_nli_label_mapping_by_name(rule_judge):
    judge, wrapped = rule_judge
    expected = {v.lower(): k for k, v in wrapped.config.id2label.items()}
    assert judge.labels == expected
    assert judge.predict([("it is paris", "paris"), ("paris", "lyon"), ("paris", "it is paris")]) == [
        "entailment", "contradiction", "neutral"]


def test_nli_pair_order_is_premise_then_hypothesis(rule_judge):
    judge, wrapped = rule_judge
    judge.predict([("it is paris", "lyon")])
    assert wrapped.pairs[-1] == ("is it paris", "lyon")


def test_nli_strict_and_non_strict(rule_judge):
    judge, _ = rule_judge
    # "it is paris" -> "paris" entails; "paris" -> "it is paris" is neutral: non-strict says equivalent.
    assert judge.cluster(["paris", "it is paris", "lyon"]) == [0, 0, 1]
    judge.strict = True
    assert judge.cluster(["paris", "it is paris", "lyon"]) == [0, 1, 2]


def test_nli_batching_and_identical_strings_short_circuit(rule_judge):
    judge, wrapped = rule_judge
    ids = judge.cluster(["paris", "paris", "it is paris", "paris", "lyon"])
    assert ids == [0, 0, 0, 0, 1]
    # 3 distinct strings -> 6 ordered pairs, in batches of at most 4: two forward passes, none for duplicates.
    assert wrapped.batches == [4, 2]
    judge.cluster(["paris", "it is paris"])  # cached: no new forward
    assert wrapped.batches == [4, 2]


def test_nli_question_is_prepended(rule_judge):
    judge, wrapped = rule_judge
    judge.cluster(["paris", "lyon"], question="what")
    assert {("paris what", "lyon what"), ("lyon what", "paris what")} <= set(wrapped.pairs)


def test_nli_unmappable_labels_fail_clearly():
    model, tokenizer = build_tiny_nli({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="cannot map its labels"):
        se.NLIJudge(model, tokenizer, device="cpu")


def test_nli_real_tiny_model_runs_end_to_end():
    model, tokenizer = build_tiny_nli({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    ids = se.NLIJudge(model, tokenizer, device="cpu").cluster(["paris", "lyon", "paris"])
    assert ids[0] == ids[2] and set(ids) <= {0, 1}


# ---------------------------------------------------------------------------------------------- likelihoods and CLI
def test_sequence_log_likelihoods_match_a_plain_forward(tiny_model, tiny_tokenizer):
    import grpo_mini as g

    answers = ["7", "The answer is 42."]
    got = se.sequence_log_likelihoods(tiny_model, tiny_tokenizer, "What is 3 + 4?", answers, device="cpu")
    prompt = g.format_prompt(tiny_tokenizer, "What is 3 + 4?")
    for answer, value in zip(answers, got):
        p = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
        a = tiny_tokenizer(answer, add_special_tokens=False).input_ids
        logits = tiny_model(torch.tensor([p + a])).logits[0, len(p) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(a)[:, None]).mean().item()
        assert value == pytest.approx(expected, abs=1e-5)


def test_cli_math_judge_and_lm(tiny_model_dir):
    result = run_script("semantic_entropy.py", "--judge", "math", "--question", "What is 6+6?", "--lm", tiny_model_dir,
                        "It is 12.", "\\boxed{12}", "13")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cluster 0: 'It is 12.'" in result.stdout and "cluster 1: '13'" in result.stdout
    assert "discrete semantic entropy: 0.6365 nats" in result.stdout
    assert "likelihood-weighted semantic entropy:" in result.stdout


def test_cli_bad_nli_model_is_one_line(tmp_path):
    result = run_script("semantic_entropy.py", "--nli-model", tmp_path / "nope", "a", "b")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --nli-model")
