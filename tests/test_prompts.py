"""Q-Align prompts (method.md, sections 1-2) and qalign-tiny's tokenisation of them."""

from __future__ import annotations

import random

import pytest

from qalign import prompts as P


def test_inference_prompt_matches_upstream_exactly():
    assert P.owl_prompt().text == (
        "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
    )
    assert P.owl_prompt("aesthetics").text == (
        "USER: How would you rate the aesthetics of this image?\n<|image|>\nASSISTANT: The aesthetics of the image is"
    )
    assert P.owl_prompt("quality", "video").text == (
        "USER: How would you rate the quality of this video?\n<|image|>\nASSISTANT: The quality of the video is"
    )


def test_prompt_split_around_the_placeholder():
    prompt = P.owl_prompt()
    assert P.IMAGE_PLACEHOLDER not in prompt.before_image + prompt.after_image
    assert prompt.text.count(P.IMAGE_PLACEHOLDER) == 1
    assert prompt.after_image.endswith(" is")  # the next token is the level word
    custom = P.owl_prompt(q="Rate the quality of this image.")
    assert custom.before_image == "USER: Rate the quality of this image.\n"


def test_training_answers():
    assert P.answer("good") == "The quality of the image is good."
    assert P.answer("bad", "aesthetics") == "The aesthetics of the image is bad."
    assert P.answer("fair", "quality", "video") == "The quality of the video is fair."


def test_training_questions_include_the_upstream_paraphrases():
    quality = P.training_questions("quality", "image")
    for q in (
        "How would you rate the quality of this image?",
        "Can you rate the quality of this picture?",
        "What is your quality rating for this image?",
        "Rate the quality of this image.",
        "Could you evaluate the quality of this image?",
        "How do you assess the quality of this image?",
    ):
        assert q in quality
    aesthetics = P.training_questions("aesthetics", "image")
    for q in ("Can you evaluate the aesthetics of the image?", "Rate the aesthetics of this picture.",
              "How is the aesthetics of this image?"):
        assert q in aesthetics
    assert not set(quality) & set(aesthetics)
    video = P.training_questions("quality", "video")
    assert all("image" not in q and "picture" not in q for q in video)
    assert all("video" in q or "clip" in q for q in video)


def test_random_question_is_seeded_and_drawn_from_the_set():
    a = [P.random_question(random.Random(7)) for _ in range(3)]
    b = [P.random_question(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    drawn = {P.random_question(rng) for _ in range(200)}
    assert drawn == set(P.training_questions())


def test_unknown_task_or_input_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        P.question("sharpness")
    with pytest.raises(ValueError, match="unknown input"):
        P.answer_prefix("quality", "audio")
    with pytest.raises(ValueError):
        P.training_questions("colour")


# ----------------------------------------------------------------- qalign-tiny tokenisation


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_model import build_tokenizer

    return build_tokenizer()


def test_tiny_prompter_chatml_layout(tokenizer):
    from qalign.models.tiny.backend import TinyPrompter
    from qalign.models.tiny.modeling_qalign_tiny import IMAGE_TOKEN_ID

    prompter = TinyPrompter(tokenizer)
    ids = prompter.prompt_ids("quality", "image")
    assert ids.count(IMAGE_TOKEN_ID) == 1
    k = ids.index(IMAGE_TOKEN_ID)
    before = tokenizer.decode(ids[:k])
    after = tokenizer.decode(ids[k + 1:])
    assert before == "<|im_start|>user\nHow would you rate the quality of this image?\n"
    assert after == "<|im_end|>\n<|im_start|>assistant\nThe quality of the image is"
    assert tokenizer.unk_token_id not in ids
    # The training answer continues the prompt with the level word as ONE token.
    answer = prompter.answer_ids(3)
    assert answer[0] == prompter.level_ids[3]
    assert tokenizer.decode(answer) == " good.<|im_end|>"


def test_level_ids_are_distinct_single_tokens_with_leading_space(tokenizer):
    from qalign.models.tiny.backend import level_token_ids

    ids = level_token_ids(tokenizer)
    assert len(set(ids)) == 5
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == [" bad", " poor", " fair", " good", " excellent"]


def test_level_words_that_split_are_refused():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qalign.models.tiny.backend import level_token_ids

    # Character-level vocabulary: " good" becomes five tokens.
    chars = sorted(set(" badpoorfairgoodexcellent"))
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(["[UNK]", *chars])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(ValueError, match="not a single token"):
        level_token_ids(fast)
