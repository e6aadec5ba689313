"""Chat rows (`data.messages_column`): rendered with the tokenizer's chat template, the loss on the
assistant turns only; a base without a template is refused with the key named; bad turns follow
data.on_bad_row with file and line."""

import json
import shutil

import pytest

from flora_train.config import load_recipe
from flora_train.data import IGNORE, BadRows, Columns, DataError, load_examples, tokenize_examples
from flora_train.base import load_tokenizer
from flora_train.train.run import run_training

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chat(user, i):
    return {"user_id": user, "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": f"favourite colour {i} ?"},
                                          {"role": "assistant", "content": " blue"},
                                          {"role": "user", "content": "and the city ?"},
                                          {"role": "assistant", "content": " paris"}]}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_loss_on_assistant_turns_only(tmp_path, chat_model):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(_chat(f"u{i % 3}", i)) + "\n" for i in range(6)))
    cols = Columns(messages="messages")
    tok = load_tokenizer(str(chat_model))
    ds = tokenize_examples(load_examples(path, "auto", cols, BadRows()), tok, 256, True, BadRows())
    ids, labels = ds["input_ids"][0], ds["labels"][0]
    learned = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert learned.replace(" ", "") == "blue</s>paris</s>".replace(" ", ""), learned
    assert "favourite" in tok.decode(ids) and "favourite" not in learned and "be brief" not in learned
    plain = load_tokenizer(str(chat_model))
    plain.chat_template = None
    with pytest.raises(DataError, match="data.messages_column: chat rows need the tokenizer's chat template"):
        tokenize_examples(load_examples(path, "auto", cols, BadRows()), plain, 256, True, BadRows())


def test_bad_turns_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [_chat("a", 0), {"user_id": "a", "messages": [{"role": "robot", "content": "x"}]},
            {"user_id": "a", "messages": [{"role": "user", "content": "only a question"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"c\.jsonl:2: user 'a': turn 0 of 'messages' must be"):
        load_examples(path, "auto", Columns(messages="messages"), BadRows())
    bad = BadRows("skip")
    assert len(load_examples(path, "auto", Columns(messages="messages"), bad)) == 1
    assert bad.counts == {"bad_turn": 1, "no_assistant_turn": 1}


def test_openai_content_parts_read_as_their_text(tmp_path, chat_model):
    """Turns whose content is OpenAI's list of parts (what `serve` takes, and what OpenAI-format
    datasets hold) were refused as bad turns; text parts are now the turn's text, joined by newlines
    as `serve` joins them, and give the same tokens as the same turns written as strings. A part of
    another kind is a bad row naming it."""
    import copy

    cols = Columns(messages="messages")
    tok = load_tokenizer(str(chat_model))
    plain, parts = _chat("a", 0), copy.deepcopy(_chat("a", 0))
    parts["messages"][1]["content"] = [{"type": "text", "text": "favourite"}, {"type": "text", "text": "colour 0 ?"}]
    parts["messages"][2]["content"] = [{"type": "text", "text": " blue"}]
    plain["messages"][1]["content"] = "favourite\ncolour 0 ?"
    image = {"user_id": "b", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                          {"role": "assistant", "content": "ok"}]}
    bare = {"user_id": "c", "messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "ok"}]}
    got = {}
    for name, rows in (("plain", [plain]), ("parts", [parts, image, bare])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        bad = BadRows("skip")
        got[name] = tokenize_examples(load_examples(path, "auto", cols, bad), tok, 256, True, BadRows())
        assert len(got[name]) == 1
    assert got["parts"]["input_ids"][0] == got["plain"]["input_ids"][0]
    assert got["parts"]["labels"][0] == got["plain"]["labels"][0]
    assert bad.examples == [
        f"{tmp_path / 'parts.jsonl'}:2: user 'b': turn 0 of 'messages': content[0] is of type 'image_url': this model "
        "reads text only (parts of type 'text')",
        f"{tmp_path / 'parts.jsonl'}:3: user 'c': turn 0 of 'messages': content[0] is 'hi', not a content part "
        "({'type': 'text', 'text': ...})"]


def test_the_developer_role_is_system_where_the_template_does_not_name_it(tmp_path, chat_model):
    """OpenAI's newer clients send `developer` where `system` was: a training row with it was a bad turn,
    and `serve` and `generate` wrote a `<developer>` header the model never saw. A template that names
    the role (gpt-oss's) still gets it as it is."""
    from flora_train.chat_template import apply_chat_template

    tok = load_tokenizer(str(chat_model))
    system, developer = _chat("a", 0), _chat("a", 0)
    developer["messages"][0]["role"] = "developer"
    got = {}
    for name, row in (("system", system), ("developer", developer)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        got[name] = tokenize_examples(load_examples(path, "auto", Columns(messages="messages"), BadRows()),
                                      tok, 256, True, BadRows())
    assert got["developer"]["input_ids"][:] == got["system"]["input_ids"][:]
    assert got["developer"]["labels"][:] == got["system"]["labels"][:]
    rendered = apply_chat_template(tok, developer["messages"], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<system>be brief</s>") and "developer" not in rendered
    tok.chat_template = TEMPLATE.replace("{% for m", "{# roles: system, developer, user, assistant #}{% for m")
    rendered = apply_chat_template(tok, developer["messages"], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<developer>be brief</s>")


def test_a_run_trains_on_chat_rows(tmp_path, chat_model):
    train = tmp_path / "train.jsonl"
    # One exchange a row: the whole conversation (76 tokens) is past the tiny base's 64 positions.
    rows = [{**_chat(f"user-{i % 4}", i), "messages": _chat("", i)["messages"][:3]} for i in range(16)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_training(load_recipe(None, [f"base.name_or_path={chat_model}", f"data.train_path={train}",
                                             "data.messages_column=messages", "data.eval_examples_per_user=1",
                                             f"run_dir={tmp_path / 'run'}", "train.users_per_step=4", "train.epochs=3",
                                             "tracking.enabled=false", "train.progress=false",
                                             "adapter.target_modules=[q_proj,v_proj]"]))
    assert result["steps"] > 0 and result["eval"]["eval/users"] == 4


def test_a_conversation_the_template_refuses_is_a_bad_row(tmp_path, chat_model):
    # Mistral's and Llama 2's templates raise_exception() on conversations they refuse (no system
    # role, roles that do not alternate): that is the row meeting the template's rules, so it is a
    # bad row naming the file, line, user and the template's words (a jinja2 traceback before).
    tok = load_tokenizer(str(chat_model))
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + TEMPLATE)
    path = tmp_path / "c.jsonl"
    no_system = {"user_id": "b", "messages": _chat("b", 1)["messages"][1:]}
    path.write_text(json.dumps(no_system) + "\n" + json.dumps(_chat("a", 0)) + "\n")
    cols = Columns(messages="messages")
    with pytest.raises(DataError, match=r"c\.jsonl:2: user 'a': the chat template refuses this conversation: "
                                        r"System role not supported \(set data.on_bad_row=skip"):
        tokenize_examples(load_examples(path, "auto", cols, BadRows()), tok, 256, True, BadRows())
    bad = BadRows("skip")
    ds = tokenize_examples(load_examples(path, "auto", cols, BadRows()), tok, 256, True, bad)
    assert ds["user_id"] == ["b"] and bad.counts == {"template_refused": 1}
