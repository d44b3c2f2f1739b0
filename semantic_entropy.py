"""semantic_entropy.py: how unsure is a model about the MEANING of its answer? Semantic entropy, step by step.

Sample several answers to one question. Token-level entropy would call "Paris" and "It's Paris." different
outcomes, but they mean the same thing. Semantic entropy (Kuhn et al., ICLR 2023, arXiv 2302.09664; Farquhar et
al., Nature 2024) first groups answers that mean the same thing, then measures the entropy over those groups:

    1. cluster:   a and b share a cluster when a entails b AND b entails a (bidirectional entailment)
    2. estimate:  p(C_k) from cluster sizes (discrete) or from the answers' likelihoods (likelihood-weighted)
    3. entropy:   SE = -sum_k p(C_k) log p(C_k)        (natural log; 0 = one meaning, log G = all different)

Two judges decide "means the same": an NLI model (any transformers sequence-classification checkpoint with
entailment / neutral / contradiction labels) for free text, and a maths-answer judge (same final number) that
needs no model, which is what seed_grpo.py runs on every GRPO group.

Run it:

    python semantic_entropy.py --judge math "It is 12." "\\boxed{12}" "12.0" "13"
    python semantic_entropy.py --question "What is the capital of France?" "Paris" "It's Paris." "Lyon"
        # NLI judge, default microsoft/deberta-large-mnli (from the hub; --nli-model DIR for a local copy)
    python semantic_entropy.py --lm HuggingFaceTB/SmolLM2-135M-Instruct --question "..." "a1" "a2" ...
        # adds the likelihood-weighted estimators, with each answer's likelihood under that causal LM

It prints the clusters and the estimators. Sections: 1. clustering  2. judges  3. estimators  4. likelihoods
5. command line.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from grpo_mini import (ConfigError, completion_logps, extract_final_number, final_answer_text, format_prompt,
                       load_model_and_tokenizer, mean_token_logps, pick_device)

DEFAULT_NLI_MODEL = "microsoft/deberta-large-mnli"

# ======================================================================================================================
# 1. Clustering
# ======================================================================================================================


def semantic_ids(responses: Sequence[str], equivalent: Callable[[str, str], bool]) -> list:
    """Greedy bidirectional-entailment clustering: one cluster id per response, ids 0..K-1 by first appearance.

    Responses are taken in order; each is compared with the FIRST member of every existing cluster and joins the
    first cluster where equivalent(member, response) and equivalent(response, member) both hold, else it opens a
    new cluster. `equivalent` may be asymmetric (entailment is), so both directions are always asked.
        semantic_ids(["Paris", "It's Paris", "Lyon"], same_city) == [0, 0, 1]
    """
    ids: list = []
    representatives: list = []  # index of each cluster's first member
    for i, response in enumerate(responses):
        for cluster, rep in enumerate(representatives):
            if equivalent(responses[rep], response) and equivalent(response, responses[rep]):
                ids.append(cluster)
                break
        else:
            representatives.append(i)
            ids.append(len(representatives) - 1)
    return ids


# ======================================================================================================================
# 2. Judges
# ======================================================================================================================


class MathAnswerJudge:
    """Two answers are equivalent when their final numbers are equal (\\boxed{...} or the last number).

    Comparison is numeric, so "12", "12.0" and "\\boxed{12}" match and "3/4" matches "0.75". A response with no
    number cannot be equivalent to anything, not even to an identical answer-less response: each is its own
    cluster (as in SEED-GRPO). No model is involved, so this runs on every GRPO group at no cost."""

    extract = staticmethod(extract_final_number)  # text -> the final answer, or None

    def __init__(self, tolerance: float = 1e-6):
        self.tolerance = tolerance
        self._cache: dict = {}

    def answer(self, text: str):
        if text not in self._cache:
            self._cache[text] = self.extract(text)
        return self._cache[text]

    def equivalent(self, a: str, b: str) -> bool:
        x, y = self.answer(a), self.answer(b)
        return x is not None and y is not None and abs(x - y) <= self.tolerance * max(1.0, abs(x), abs(y))

    def cluster(self, responses: Sequence[str], question: Optional[str] = None) -> list:
        """Cluster ids for responses (the question is not needed to compare numbers)."""
        return semantic_ids(responses, self.equivalent)


class ExactAnswerJudge(MathAnswerJudge):
    """Two answers are equivalent when the TEXT of their final answers is identical: the content of the last
    \\boxed{...}, else the last number, as written. This is how the SEED-GRPO authors' released code is reported to
    cluster, so "12" and "12.0" are two clusters here, where MathAnswerJudge makes them one. An answer-less response
    is its own cluster.
        cluster(["so 12", "it is 12.0", "12", "no idea", "no idea"]) == [0, 1, 0, 2, 3]"""

    extract = staticmethod(final_answer_text)

    def equivalent(self, a: str, b: str) -> bool:
        x, y = self.answer(a), self.answer(b)
        return x is not None and x == y


def nli_label_indices(id2label: dict, model_name: str = "the NLI model") -> dict:
    """Map 'entailment' / 'neutral' / 'contradiction' to class indices by NAME, from config.id2label.

    Checkpoints order their labels differently (deberta-large-mnli: 0 = CONTRADICTION, 2 = ENTAILMENT; others the
    reverse), so the order is never assumed. Names are matched case-insensitively by prefix."""
    wanted = {"entailment": "entail", "neutral": "neutral", "contradiction": "contradict"}
    found = {}
    for index, label in (id2label or {}).items():
        for name, prefix in wanted.items():
            if str(label).lower().startswith(prefix):
                found[name] = int(index)
    if set(found) != set(wanted):
        raise ConfigError(f"--nli-model {model_name}: cannot map its labels {dict(id2label or {})} to entailment / "
                          "neutral / contradiction; use an NLI checkpoint whose config.id2label names them")
    return found


class NLIJudge:
    """Bidirectional entailment with an NLI model: premise = a, hypothesis = b.

    strict=True:  a and b are equivalent when both directions are predicted "entailment".
    strict=False: neither direction is "contradiction" and not both are "neutral" (Kuhn et al.'s code).
    question:     when given, it is prepended to both premise and hypothesis (Farquhar et al.'s pipeline).

    Efficient by construction: identical strings are equivalent without a forward pass, and `cluster` computes
    every needed decision for a group in batched forward passes (batch_size pairs each) before clustering."""

    def __init__(self, model=DEFAULT_NLI_MODEL, tokenizer=None, *, strict: bool = False, device: str = "auto",
                 batch_size: int = 64, max_length: int = 256):
        if isinstance(model, str):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            name = model
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
                model = AutoModelForSequenceClassification.from_pretrained(name)
            except Exception as err:  # noqa: BLE001 - one clear line instead of a hub traceback
                raise ConfigError(f"--nli-model {name}: could not load it ({type(err).__name__}); pass a local "
                                  "directory, allow hub downloads, or use --judge math") from None
        self.model_name = getattr(model, "name_or_path", "the NLI model")
        self.labels = nli_label_indices(model.config.id2label, self.model_name)
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.strict, self.batch_size, self.max_length = strict, batch_size, max_length
        self._cache: dict = {}  # (premise, hypothesis) -> label name

    @torch.no_grad()
    def predict(self, pairs: Sequence[tuple]) -> list:
        """NLI label name for each (premise, hypothesis) pair, in batched forward passes."""
        names = {index: name for name, index in self.labels.items()}
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            enc = self.tokenizer([p for p, _ in chunk], [h for _, h in chunk], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits  # [pairs, num_labels]
            out += [names.get(int(i), "neutral") for i in logits.argmax(dim=-1).tolist()]
        return out

    def _decide(self, forward: str, backward: str) -> bool:
        if self.strict:
            return forward == backward == "entailment"
        return "contradiction" not in (forward, backward) and not (forward == backward == "neutral")

    def _text(self, answer: str, question: Optional[str]) -> str:
        return f"{question} {answer}" if question else answer

    def cluster(self, responses: Sequence[str], question: Optional[str] = None) -> list:
        """Cluster ids for one group. All ordered pairs of distinct responses go through the model at once."""
        texts = [self._text(r, question) for r in responses]
        unique = list(dict.fromkeys(texts))
        todo = [(a, b) for a in unique for b in unique if a != b and (a, b) not in self._cache]
        for pair, label in zip(todo, self.predict(todo)):
            self._cache[pair] = label
        return semantic_ids(texts, self.equivalent)

    def equivalent(self, a: str, b: str) -> bool:
        """The pairwise decision from both NLI directions (cached); identical strings skip the model."""
        if a == b:
            return True
        for pair in ((a, b), (b, a)):
            if pair not in self._cache:
                self._cache[pair] = self.predict([pair])[0]
        return self._decide(self._cache[(a, b)], self._cache[(b, a)])


# ======================================================================================================================
# 3. Estimators (natural log)
# ======================================================================================================================


def _check_ids(ids: Sequence[int]) -> np.ndarray:
    if len(ids) == 0:
        raise ValueError("semantic entropy needs at least one response (got an empty list)")
    return np.asarray(ids, dtype=np.int64)


def _logsumexp(values: np.ndarray) -> float:
    top = np.max(values)
    if not np.isfinite(top):
        return float(top)
    return float(top + np.log(np.sum(np.exp(values - top))))


def cluster_log_probs(ids: Sequence[int], log_likelihoods: Sequence[float]) -> np.ndarray:
    """log p(C_k) for k = 0..K-1: each cluster's share of the total likelihood, computed in log space.

        log p(C_k) = logsumexp_{i in C_k} l_i - logsumexp_{all j} l_j
    A stable logsumexp keeps this finite for long answers (l_i around -800, where exp(l_i) underflows to 0).
    Errors: mismatched lengths, NaN, +inf or all -inf log-likelihoods raise ValueError."""
    ids = _check_ids(ids)
    l = np.asarray(log_likelihoods, dtype=np.float64)
    if l.shape != ids.shape:
        raise ValueError(f"got {len(ids)} cluster ids but {l.size} log-likelihoods")
    if np.isnan(l).any() or np.isposinf(l).any():
        raise ValueError(f"log-likelihoods must be finite or -inf, got {l.tolist()}")
    total = _logsumexp(l)
    if not np.isfinite(total):
        raise ValueError("every log-likelihood is -inf: the answers have no probability mass")
    return np.array([_logsumexp(l[ids == k]) - total for k in range(ids.max() + 1)])


def discrete_semantic_entropy(ids: Sequence[int]) -> float:
    """Entropy of the cluster frequencies: p_k = |C_k| / N, SE = -sum_k p_k log p_k.

    Example: 6 answers in clusters of sizes 4 and 2: -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.6365.
    One response, or all in one cluster: 0. N all-different responses: log N (the maximum)."""
    counts = np.bincount(_check_ids(ids))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def semantic_entropy(ids: Sequence[int], log_likelihoods: Sequence[float]) -> float:
    """Likelihood-weighted ("Rao") semantic entropy, what Farquhar et al.'s code reports:

        p_k = exp(log p(C_k)) from cluster_log_probs;  SE = -sum_k p_k log p_k
    Pass length-normalised log-likelihoods (each answer's MEAN token log-prob), as Farquhar's pipeline does; raw
    sums would make the longest answer's cluster look improbable just for being long.
    Example: ids [0, 0, 1], likelihoods [0.5, 0.25, 0.25] -> p = [0.75, 0.25] -> SE = 0.5623."""
    log_p = cluster_log_probs(ids, log_likelihoods)
    p = np.exp(log_p)
    return float(-(p * np.where(p > 0, log_p, 0.0)).sum()) + 0.0


def monte_carlo_semantic_entropy(ids: Sequence[int], log_likelihoods: Sequence[float]) -> float:
    """Kuhn et al.'s Monte-Carlo form: SE = -(1/K) sum_k log p(C_k), the mean over the K clusters.

    We normalise p(C_k) across the samples (cluster_log_probs), so one cluster gives exactly 0; Kuhn's released
    code left the likelihoods unnormalised. Example: p = [0.75, 0.25] -> (0.2877 + 1.3863) / 2 = 0.8370."""
    return float(-cluster_log_probs(ids, log_likelihoods).mean()) + 0.0


# ======================================================================================================================
# 4. Likelihoods under a causal LM
# ======================================================================================================================


@torch.no_grad()
def sequence_log_likelihoods(model, tokenizer, prompt: str, answers: Sequence[str], device: str = "auto",
                             length_normalised: bool = True) -> list:
    """log p(answer | prompt) for each answer under a causal LM: the mean token log-prob (length-normalised, the
    default) or the sum. The prompt goes through the chat template, like grpo_mini's prompts."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    prompt_enc = tokenizer([format_prompt(tokenizer, prompt)], return_tensors="pt", add_special_tokens=False).to(dev)
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids or [tokenizer.eos_token_id] for a in answers]
    width = max(map(len, answer_ids))
    completion = torch.full((len(answers), width), tokenizer.pad_token_id, device=dev)
    mask = torch.zeros(len(answers), width, device=dev)
    for row, ids in enumerate(answer_ids):
        completion[row, :len(ids)] = torch.tensor(ids, device=dev)
        mask[row, :len(ids)] = 1.0
    every_row_shares_the_prompt = torch.zeros(len(answers), dtype=torch.long, device=dev)
    token_logps = completion_logps(model, prompt_enc.input_ids, prompt_enc.attention_mask, completion, mask, 1.0,
                                   prompt_index=every_row_shares_the_prompt)
    scores = mean_token_logps(token_logps, mask) if length_normalised else (token_logps * mask).sum(dim=1)
    return scores.tolist()


# ======================================================================================================================
# 5. Command line
# ======================================================================================================================


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="Cluster answers by meaning and print their semantic entropy.")
    parser.add_argument("responses", nargs="+", help="the sampled answers to one question")
    parser.add_argument("--question", default=None, help="the question; the NLI judge prepends it to each answer")
    parser.add_argument("--judge", choices=["nli", "math"], default="nli",
                        help="nli: bidirectional entailment with an NLI model; math: same final number")
    parser.add_argument("--nli-model", default=DEFAULT_NLI_MODEL, help="hub id or directory of an NLI checkpoint")
    parser.add_argument("--strict", action="store_true", help="NLI: require entailment in both directions")
    parser.add_argument("--no-question-in-nli", action="store_true", help="NLI: do not prepend the question")
    parser.add_argument("--lm", default=None,
                        help="causal LM (hub id, directory or .gguf) for the likelihood-weighted estimators")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    try:
        pick_device(args.device)  # an unknown or absent device: one line now, not a traceback after a model loads
        if args.lm and not args.question:
            raise ConfigError("--lm needs --question: the likelihood is p(answer | question)")
        if args.judge == "math":
            judge, context = MathAnswerJudge(), None
        else:
            judge = NLIJudge(args.nli_model, strict=args.strict, device=args.device)
            context = None if args.no_question_in_nli else args.question
        ids = judge.cluster(args.responses, context)
        likelihoods = None
        if args.lm:
            try:
                lm, tokenizer = load_model_and_tokenizer(args.lm)
            except ConfigError as err:  # the loader names --model, its flag in the training scripts
                raise ConfigError(str(err).replace("--model", "--lm", 1)) from None
            likelihoods = sequence_log_likelihoods(lm, tokenizer, args.question, args.responses, args.device)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for k in range(max(ids) + 1):
        members = [f"{r!r}" + (f" (mean logp {likelihoods[i]:.3f})" if likelihoods else "")
                   for i, r in enumerate(args.responses) if ids[i] == k]
        print(f"cluster {k}: " + ", ".join(members))
    n = len(args.responses)
    print(f"discrete semantic entropy: {discrete_semantic_entropy(ids):.4f} nats (max log {n} = {math.log(n):.4f})")
    if likelihoods:
        print(f"likelihood-weighted semantic entropy: {semantic_entropy(ids, likelihoods):.4f} nats")
        print(f"Monte-Carlo (Kuhn) semantic entropy: {monte_carlo_semantic_entropy(ids, likelihoods):.4f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
