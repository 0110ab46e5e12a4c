"""Token features: label masks for both families, dialogue-only truncation, dynamic padding."""

from __future__ import annotations

import pytest

from conftest import tiny
from dsum.data import Example
from dsum.features import IGNORE_INDEX, Collator, Featurizer
from dsum.modeling import train_tokenizer

DIALOGUE = "#Person1#: Hello, I'd like to book a table for four on Friday.\n#Person2#: Certainly. What time?\n#Person1#: 7 pm."
SUMMARY = "#Person1# books a table for four on Friday at 7 pm."


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {}
    for family in ("t5", "llama"):
        recipe = tiny(f"{family}-full", tmp_path_factory.mktemp(family))
        out[family] = (recipe, train_tokenizer(recipe, [DIALOGUE, SUMMARY] * 50))
    return out


def decode(tokenizer, ids):
    return tokenizer.decode([i for i in ids if i != IGNORE_INDEX])


def test_seq2seq_features_are_prompt_in_summary_out(tokenizers):
    recipe, tok = tokenizers["t5"]
    f = Featurizer(recipe, tok).training_feature(Example("a", DIALOGUE, (SUMMARY,)))
    assert decode(tok, f.input_ids) == f"Summarize the following conversation.\n\n{DIALOGUE}\n\nSummary: </s>"
    assert decode(tok, f.labels) == SUMMARY + "</s>"


def test_causal_labels_mask_the_prompt(tokenizers):
    recipe, tok = tokenizers["llama"]
    f = Featurizer(recipe, tok).training_feature(Example("a", DIALOGUE, (SUMMARY,)))
    assert len(f.input_ids) == len(f.labels)
    supervised = [i for i, label in enumerate(f.labels) if label != IGNORE_INDEX]
    first = supervised[0]
    assert supervised == list(range(first, len(f.labels)))  # one block, to the end
    assert all(label == IGNORE_INDEX for label in f.labels[:first])
    assert f.input_ids[0] == tok.bos_token_id
    assert decode(tok, f.input_ids[:first]).endswith("Summary:")
    assert decode(tok, f.labels) == " " + SUMMARY + "</s>"
    assert f.labels[first:] == f.input_ids[first:]


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_truncation_cuts_the_dialogue_never_the_instruction_or_summary_start(tokenizers, family):
    recipe, tok = tokenizers[family]
    recipe = recipe.model_copy(deep=True)
    recipe.tokenizer.max_source_length = 40
    recipe.tokenizer.max_target_length = 6
    featurizer = Featurizer(recipe, tok)
    long_dialogue = DIALOGUE * 10
    f = featurizer.training_feature(Example("a", long_dialogue, (SUMMARY,)))
    prompt = [t for t, label in zip(f.input_ids, f.labels) if label == IGNORE_INDEX] if family == "llama" else f.input_ids
    text = decode(tok, prompt)
    assert len(prompt) == 40
    assert text.removeprefix("<s>").startswith("Summarize the following conversation.")
    assert "\n\nSummary:" in text[-16:]
    target = [t for t in f.labels if t != IGNORE_INDEX]
    assert len(target) == 6 and target[-1] == tok.eos_token_id
    assert SUMMARY.startswith(decode(tok, target[:-1]).strip())
    assert featurizer.stats.as_dict() == {"examples": 1, "dialogues_truncated": 1, "summaries_truncated": 1}


class CountingTokenizer:
    """A tokenizer that counts its calls and the texts it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.texts = tokenizer, 0, 0

    def __call__(self, texts, **kwargs):
        self.calls += 1
        self.texts += len(texts) if isinstance(texts, list) else 1
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_features_of_many_examples_equal_each_made_alone_from_few_tokenizer_calls(tokenizers, family):
    recipe, tok = tokenizers[family]
    recipe = recipe.model_copy(deep=True)
    recipe.tokenizer.max_source_length = 48  # some dialogues are cut, some are not
    recipe.tokenizer.max_target_length = 12
    examples = [Example(str(i), DIALOGUE[: 12 * i], (SUMMARY[: 5 * i + 1],)) for i in range(12)]
    examples += [examples[5], Example("empty", "", ("",)), Example("long", DIALOGUE * 4, (SUMMARY * 3,))]
    alone = Featurizer(recipe, tok)
    expected = [alone.training_feature(e) for e in examples]
    counting = CountingTokenizer(tok)
    together = Featurizer(recipe, counting)
    assert together.training_features(examples) == expected
    assert together.stats == alone.stats and alone.stats.dialogues_truncated and alone.stats.summaries_truncated
    # One call each for the instructions, the dialogues, the cues and the summaries; every distinct text once.
    assert counting.calls == 4
    distinct = len({e.dialogue for e in examples if e.dialogue}) + len({e.references[0] for e in examples}) + 2
    assert counting.texts <= distinct
    assert together.prompts_ids([e.dialogue for e in examples]) == [alone.prompt_ids(e.dialogue) for e in examples]


def test_an_instruction_longer_than_the_budget_is_an_error(tokenizers):
    from dsum.config import RecipeError

    recipe, tok = tokenizers["t5"]
    recipe = recipe.model_copy(deep=True)
    recipe.tokenizer.max_source_length = 5
    with pytest.raises(RecipeError, match="tokenizer.max_source_length"):
        Featurizer(recipe, tok).training_feature(Example("a", DIALOGUE, (SUMMARY,)))


def test_collator_pads_to_the_longest_row_only(tokenizers):
    recipe, tok = tokenizers["t5"]
    featurizer = Featurizer(recipe, tok)
    features = [featurizer.training_feature(Example(str(i), DIALOGUE[: 30 + 20 * i], (SUMMARY[: 10 + 10 * i],)))
                for i in range(3)]
    batch = Collator(tok.pad_token_id, decoder_start_token_id=tok.pad_token_id)(features)
    assert batch["input_ids"].shape[1] == max(len(f.input_ids) for f in features)
    assert batch["labels"].shape[1] == max(len(f.labels) for f in features)
    assert batch["attention_mask"].sum().item() == sum(len(f.input_ids) for f in features)
    assert (batch["labels"] == IGNORE_INDEX).sum().item() == sum(batch["labels"].shape[1] - len(f.labels) for f in features)
    assert batch["decoder_input_ids"][0, 0].item() == tok.pad_token_id
    assert batch["decoder_input_ids"][0, 1].item() == features[0].labels[0]
    assert Collator(tok.pad_token_id, decoder_start_token_id=tok.pad_token_id).batch(features).targets == sum(
        len(f.labels) for f in features)


def test_few_shot_prompts_fit_the_budget_and_put_solved_examples_first(tokenizers):
    from dsum.prompts import pick_shots

    recipe, tok = tokenizers["t5"]
    recipe = recipe.model_copy(deep=True)
    recipe.tokenizer.max_source_length = 120
    train = [Example(str(i), DIALOGUE.replace("four", str(i)), (f"Summary number {i}.",)) for i in range(20)]
    shots = pick_shots(train, 3, seed=7)
    assert shots == pick_shots(train, 3, seed=7) and len({s.id for s in shots}) == 3  # fixed by the seed
    featurizer = Featurizer(recipe, tok, shots=shots)
    for length in range(0, 400, 25):  # from an empty dialogue to one far over budget
        ids = featurizer.prompt_ids(DIALOGUE[:length] + "x" * max(0, length - len(DIALOGUE)))
        assert len(ids) <= 120
    short = tok.decode(featurizer.prompt_ids("#Person1#: Hi."))
    assert short.count("Summary:") >= 2  # at least one solved example fits before the dialogue
    assert shots[0].references[0] in short and short.index(shots[0].references[0]) < short.rindex("#Person1#: Hi.")
    assert short.removesuffix("</s>").rstrip().endswith("Summary:")
    long = tok.decode(featurizer.prompt_ids(DIALOGUE * 20))
    assert long.count("Summary:") == 1  # no room left: the dialogue alone, cut to fit


def test_packed_rows_restart_positions_and_keep_every_example_apart(tokenizers):
    """A tiny Llama computes the same logits for each example packed in one row as for it alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsum.modeling import model_config

    recipe, tok = tokenizers["llama"]
    featurizer = Featurizer(recipe, tok)
    features = [featurizer.training_feature(Example(str(i), DIALOGUE[: 40 + 30 * i], [SUMMARY[: 20 + 9 * i]]))
                for i in range(3)]
    batch = Collator(tok.pad_token_id, packed=True)(features)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    lengths = [len(f.input_ids) for f in features]
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["labels"][0].tolist() == [t for f in features for t in f.labels]
    # Each example's labels open with its masked prompt: no loss reaches across a boundary.
    assert all(f.labels[0] == IGNORE_INDEX for f in features)
    torch.manual_seed(0)
    # FlexAttention: what dsum trains packed rows with on a GPU without flash-attn (a block-sparse document
    # mask from position_ids); on the CPU torch runs its forward, compiled, though not its backward.
    for attention in ("sdpa", "eager", "flex_attention"):
        model = AutoModelForCausalLM.from_config(model_config(recipe, tok), attn_implementation=attention).eval()
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            alone = [model(input_ids=torch.tensor([f.input_ids])).logits[0] for f in features]
        torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_packed_rows_on_a_gpu_train_with_an_attention_that_never_builds_a_row_by_row_mask(tokenizers, monkeypatch):
    import importlib.util

    from dsum.modeling import training_attention

    recipe, _ = tokenizers["llama"]
    packed = recipe.model_copy(update={"train": recipe.train.model_copy(update={"packing": True})})
    bf16 = packed.model_copy(update={"model": packed.model.model_copy(update={"dtype": "bfloat16"})})
    installed = {"flash_attn": False}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed.get(name) else None)
                        if name in installed else find_spec(name, *a))
    assert training_attention(packed, "cuda") == "flex_attention"
    assert training_attention(bf16, "cuda") == "flex_attention"
    installed["flash_attn"] = True
    assert training_attention(bf16, "cuda") == "flash_attention_2"
    assert training_attention(packed, "cuda") == "flex_attention"  # flash-attn takes bf16 or fp16 alone
    assert training_attention(packed, "cpu") is None  # FlexAttention has no backward on the CPU
    assert training_attention(recipe, "cuda") is None  # padded rows: transformers' choice
    chosen = bf16.model_copy(update={"model": bf16.model.model_copy(update={"attn_implementation": "eager"})})
    assert training_attention(chosen, "cuda") == "eager"  # the recipe's, always


def test_a_model_trained_with_flex_attention_generates_with_transformers_own(tokenizers):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dsum.modeling import model_config, restore_attention

    recipe, tok = tokenizers["llama"]
    model = AutoModelForCausalLM.from_config(model_config(recipe, tok), attn_implementation="flex_attention")
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    restore_attention(adapted)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("multiple", [1, 64])
def test_a_micro_batchs_counts_are_those_of_its_tensors(tokenizers, multiple):
    """dsum counts its own batches on the host (MicroBatch); the tensors say the same, padded, packed and
    rounded up to a multiple (the bench counts its other ways' padded batches from their tensors alike)."""
    from dsum.bench.peers import token_counts

    for family, packings in (("t5", (False,)), ("llama", (False, True))):
        recipe, tok = tokenizers[family]
        featurizer = Featurizer(recipe, tok)
        features = [featurizer.training_feature(Example(str(i), DIALOGUE[: 40 + 30 * i], [SUMMARY[: 20 + 9 * i]]))
                    for i in range(3)]
        seq2seq = family == "t5"
        for packed in packings:
            batch = Collator(tok.pad_token_id, tok.pad_token_id if seq2seq else None, packed=packed,
                             multiple=multiple).batch(features)
            tensors = batch.tensors
            if packed:  # no attention mask: the row's real tokens are the examples', the rest its padded tail
                assert batch.real_tokens == sum(len(f.input_ids) for f in features)
                assert batch.processed_tokens == tensors["input_ids"].numel()
            else:
                assert (batch.real_tokens, batch.processed_tokens) == token_counts(tensors, "seq2seq" if seq2seq
                                                                                   else "causal")
            labels = tensors["labels"] if seq2seq else tensors["labels"][:, 1:]
            assert batch.targets == int((labels != IGNORE_INDEX).sum())
            assert tensors["input_ids"].shape[1] % multiple == 0
