"""Chat data as users have it (#26): templates that rewrite earlier turns, the formats people already hold (TRL,
ShareGPT, OpenAI tool calls, their own column names), what is trained said and shown, and bad rows counted."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ROOT, assert_single_error, in_process, ok, read_metrics, train_args

import fsdp_train as ft

CHATML = "configs/chatml.jinja"
# Written for these tests after Qwen3's rule (not copied from it): an assistant turn after the last user message
# shows its reasoning in a <think> block (from reasoning_content, or split out of a content that holds </think>);
# earlier turns are shown without it. So a later user turn rewrites how an earlier reply renders.
THINK = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = m.reasoning_content if m.reasoning_content else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _user(text):
    return {"role": "user", "content": text}


def _reply(text, reasoning=None):
    return {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning else {})}


CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        _user("How long does bread rise?"),
        _reply("About two hours.", "Yeast is slow in a cool kitchen."),
        _user("And sourdough?"),
        _reply("<think>Wild yeast is slower still.</think>Often overnight."),
    ],
    [_user("Who lit the lamp?"), _reply("The keeper, at dusk.", "The story says so.")],
    [
        _user("Name a root."),
        _reply("A carrot."),
        _user("Another?"),
        _reply("A beet."),
        _user("One more?"),
        _reply("A parsnip.", "Keep it short."),
    ],  # fmt: skip
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(prep, capfd, save_dir, data, *extra):
    """`fsdp_train.py prepare` in this process."""
    return in_process(capfd, ["prepare", *train_args(prep, save_dir, "p", *extra, data=data)])


def _render(tok, template, messages, prompt=False):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)


def reference_reply_loss(model, tok, template, conversations) -> tuple[float, int]:
    """(summed loss, targets) of every assistant reply as at inference, computed apart from fsdp_train: the
    conversation up to the reply rendered with the generation prompt, tokenized on its own; the conversation through
    the reply tokenized on its own; plain transformers on the latter, targets the tokens after the former."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                prompt = tok(_render(tok, template, messages[:i], True), add_special_tokens=False)["input_ids"]
                turn = tok(_render(tok, template, messages[: i + 1]), add_special_tokens=False)["input_ids"]
                assert turn[: len(prompt)] == prompt
                ids = torch.tensor([turn])
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
                targets = ids[0, len(prompt) :]
                total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
    return total, count


@pytest.mark.parametrize("template", ["chatml", "think"])
def test_each_reply_trains_as_the_template_shows_it_at_inference(prep, tmp_path, capfd, template):
    """Step 1's loss (before any update) over every packed example equals plain transformers on each reply in the
    context the template gives it when the model writes it: with ChatML that is one example per conversation; with
    a template that rewrites earlier turns (reasoning kept only after the last user turn) one example per reply, its
    reasoning trained. Before #26 the second was refused ("prefixes differ")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "think.jinja"
    path.write_text(THINK if template == "think" else (ROOT / CHATML).read_text())
    rows = [{"messages": c} for c in CONVERSATIONS] * 3
    args = ["--chat-template", path, "-s", 256, "-b", 16, "--stop-at-step", 1]
    proc = ok(in_process(capfd, train_args(prep, tmp_path, "c", *args, data=_jsonl(tmp_path / "c.jsonl", rows))))

    tok = AutoTokenizer.from_pretrained(prep["model"])
    model = AutoModelForCausalLM.from_pretrained(prep["model"])
    total, count = reference_reply_loss(model, tok, path.read_text(), [c for c in CONVERSATIONS] * 3)
    assert f"trained: {count:,} tokens carry loss" in proc.stdout  # one step covers every example
    assert read_metrics(tmp_path / "c")[0]["loss"] == pytest.approx(total / count, abs=2e-5)
    rewritten = "the chat template rewrites earlier turns, so 6 conversations were trained one reply at a time"
    assert (rewritten in proc.stdout) == (template == "think"), proc.stdout
    # The reasoning is trained where the template shows it: in the think template's blocks; ChatML shows only
    # the content (reasoning_content is said to be left out; a <think> written in the content stays as text).
    blocks = ft.load_packed(next((tmp_path / ".cache" / "tokenized").iterdir()))
    trained = tok.decode(torch.cat([b["input_ids"][b["labels"] != -100] for b in blocks]))
    assert ("Yeast is slow in a cool kitchen." in trained) == (template == "think")
    assert ("9 replies' reasoning is not shown by the chat template" in proc.stdout) == (template == "chatml")


def _shown(proc) -> list[str]:
    """The trained spans of the examples `prepare --show` printed."""
    return re.findall(r"\[\[(.*?)\]\]", proc.stdout.split("[[ ]] marks", 1)[1], flags=re.S)


def test_the_formats_users_hold_train_their_replies_only(prep, tmp_path, capfd):
    """TRL prompt/completion (plain and conversational), ShareGPT, OpenAI tool calls and a user's own column names:
    each prepared with `prepare --show`, whose marked spans are exactly the replies (and their end of turn)."""

    def show(name, rows, *extra, parquet=False):
        if parquet:  # Arrow's own struct inference, as a parquet file or save_to_disk folder holds it
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), data := tmp_path / f"{name}.parquet")
        else:
            data = _jsonl(tmp_path / f"{name}.jsonl", rows)
        return ok(_prepare(prep, capfd, tmp_path / name, data, "-s", 256, "--show", 1, *extra))  # a later --show wins

    plain = [{"prompt": "Q: Who baked the bread?\nA:", "completion": " The miller's wife."}] * 2
    assert _shown(show("plain", plain)) == [" The miller's wife.<|endoftext|>"]  # no chat template needed
    (span,) = _shown(show("plain-all", plain, "--train-on", "all"))  # one span: all but the first token
    assert span.endswith(" Who baked the bread?\nA: The miller's wife.<|endoftext|>"), span

    conversational = [
        {
            "prompt": [_user("Who baked the bread?"), _reply("The miller's wife."), _user("And the cake?")],
            "completion": [_reply("Her daughter.")],
        }
    ] * 2
    assert _shown(show("trl", conversational, "--chat-template", CHATML)) == ["Her daughter.<|im_end|>\n"]

    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Who lit it?"},
                                   {"from": "gpt", "value": "The keeper."}]}] * 3  # fmt: skip
    proc = show("sharegpt", sharegpt, "--chat-template", CHATML)
    assert _shown(proc) == ["The keeper.<|im_end|>\n"]
    assert "messages: 3 system, 3 user, 3 assistant; a reply's trained span ends with '<|im_end|>\\n'" in proc.stdout

    def call(name, **arguments):  # OpenAI's shape, arguments as an object (Arrow merges all calls' argument keys)
        return {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}

    definitions = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    tools = [
        {
            "tools": definitions,
            "messages": [
                _user(question),
                {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                {"role": "tool", "content": result, "tool_call_id": "c1"},
                _reply(answer),
            ],
        }
        for question, tool_call, result, answer in [
            ("Weather in Oslo?", call("get_weather", city="Oslo"), "4 C, rain", "4 C and raining."),
            ("Time in Oslo?", call("get_time", zone="CET"), "09:00", "Nine."),
        ]
    ]
    proc = show("tools", tools, "--chat-template", CHATML, "--show", 2, parquet=True)
    assert _shown(proc) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>\n',
        "4 C and raining.<|im_end|>\n",
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call><|im_end|>\n',  # no "city": null
        "Nine.<|im_end|>\n",
    ]
    assert proc.stdout.count('# Tools\n{"name": "get_weather", "parameters": {"type": "object"}}') == 2  # defined
    # A template that does not show tool calls would train an empty reply: those rows are skipped and said.
    no_tools = tmp_path / "plain.jinja"
    no_tools.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    line = assert_single_error(
        _prepare(prep, capfd, tmp_path / "nt", tmp_path / "tools.parquet", "--chat-template", no_tools),
        "no train row can be trained",
    )
    assert "2 where the chat template does not show an assistant's tool_calls" in line

    own = [{"dialog": [{"speaker": "customer", "text": "Is it open?"}, {"speaker": "agent", "text": "Until six."}]}]
    mapping = "messages=dialog,role=speaker,content=text,user=customer,assistant=agent"
    assert _shown(show("own", own * 2, "--chat-template", CHATML, "--chat-columns", mapping)) == [
        "Until six.<|im_end|>\n"
    ]
    yaml_form = tmp_path / "own.yaml"  # the same map as a --config file's mapping
    yaml_form.write_text("chat_columns:\n  messages: dialog\n  role: speaker\n  content: text\n  user: customer\n"
                         "  assistant: agent\n")  # fmt: skip
    proc = ok(
        _prepare(
            prep,
            capfd,
            tmp_path / "y",
            tmp_path / "own.jsonl",
            "--config",
            yaml_form,
            "--show",
            1,
            "--chat-template",
            CHATML,
        )
    )
    assert _shown(proc) == ["Until six.<|im_end|>\n"]
    unmapped = _prepare(prep, capfd, tmp_path / "u", tmp_path / "own.jsonl")
    assert_single_error(unmapped, "has none of the columns we train on")
    assert "--chat-columns, e.g. text=dialog or messages=dialog" in unmapped.stdout


def test_shapes_real_sets_use(prep):
    """DeepSeek-R1-style generation prompts, OpenAI's weight 0 and content parts, ShareGPT function calls."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prep["model"])
    keys = ft.parse_chat_columns("")

    def trained(messages, template, **row):
        example = ft.example_of_row({"messages": messages, **row}, "messages", tok, template, keys, False)
        kept = [i for i, label in zip(example["ids"], example["labels"], strict=True) if label != -100]
        return tok.decode(kept), example

    # Written for this test after R1's rule: the generation prompt opens <think>, turns show only the answer.
    r1 = ("{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}{% else %}<|Assistant|>"
          "{{ m.content.split('</think>')[-1] }}<|end|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")  # fmt: skip
    conversation = [_user("Q1"), _reply("<think>why</think>A1"), _user("Q2"), _reply("A2")]
    text, example = trained(conversation, r1)
    assert text == "A1<|end|>A2<|end|>" and example["departs"] == 2 and example["hidden_reasoning"] == 1

    weighted = [_user("Q1"), {**_reply("A bad answer."), "weight": 0}, _user("Q2"), _reply("A good one.")]
    assert trained(weighted, (ROOT / CHATML).read_text())[0] == "A good one.<|im_end|>\n"

    parts = [{"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "lit it?"}]}]
    assert ft.normalize_messages([*parts, _reply("x")], keys)[0]["content"] == "Who lit it?"
    with pytest.raises(ft.ExampleProblem, match="a message's content has parts that are not text"):
        ft.normalize_messages([{"role": "user", "content": [{"type": "image_url", "text": "?"}]}, _reply("x")], keys)

    sharegpt = [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "get_weather",'
                ' "arguments": {"city": "Oslo"}}'}, {"from": "observation", "value": "4 C"}, {"from": "gpt", "value": "Cold."}]  # fmt: skip
    text, _ = trained(sharegpt, (ROOT / CHATML).read_text())
    assert (
        text
        == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>\nCold.<|im_end|>\n'
    )
    with pytest.raises(ft.ExampleProblem, match="'tool_calls' is not a list of named calls"):
        ft.normalize_messages(
            [_user("?"), {"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]}], keys
        )


def test_rows_that_train_nothing_are_skipped_by_reason_and_an_untrainable_set_is_an_error(prep, tmp_path, capfd):
    good = [_user("Who lit the lamp?"), _reply("The keeper.")]
    rows = [
        {"messages": good},
        {"messages": [_user("Who?"), {"role": "assistant", "content": None}]},  # null reply, no tool call
        {"messages": [_user(""), _reply("Nothing was asked.")]},
        {"messages": [{"role": "bot", "content": "Hi."}, *good]},
        {"messages": [*good, _user("And then?")]},  # ends on a question
        {"messages": []},
        {"messages": good},
    ]
    data = _jsonl(tmp_path / "mixed.jsonl", rows)
    proc = ok(_prepare(prep, capfd, tmp_path / "m", data, "--chat-template", CHATML, "-s", 64))
    for reason in (
        "1 where an assistant message's 'content' is null",
        "1 where a user message's 'content' is empty",
        "1 where a message's role 'bot' is unknown (name it with --chat-columns, e.g. assistant=bot or user=bot)",
        "1 where the conversation does not end with an assistant reply",
        "1 where 'messages' is null or empty",
    ):
        assert reason in proc.stdout, proc.stdout
    assert "5 rows skipped" in proc.stdout and "first: row 1:" in proc.stdout
    assert "messages: 2 user, 2 assistant" in proc.stdout  # only what is trained is counted

    # Non-string content (content parts) cannot share a file with string content in Arrow: the pure function.
    with pytest.raises(ft.ExampleProblem, match="a user message's 'content' is not a string"):
        ft.normalize_messages([{"role": "user", "content": [{"type": "text"}]}, _reply("x")], ft.parse_chat_columns(""))

    # 30 conversations with a system prompt and a question but no reply: before #26 every step logged loss 0.0000.
    unanswered = [{"messages": [{"role": "system", "content": "Be kind."}, _user(f"Question {i}?")]} for i in range(30)]
    data = _jsonl(tmp_path / "unanswered.jsonl", unanswered)
    line = assert_single_error(
        in_process(capfd, train_args(prep, tmp_path / "n", "n", "--chat-template", CHATML, data=data)),
        "no train row can be trained: 30 rows skipped (30 where the conversation does not end with an assistant reply",
    )
    assert "first: row 0" in line

    # A template that writes nothing after a reply never teaches the model to stop.
    endless = tmp_path / "endless.jinja"
    endless.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    assert_single_error(
        _prepare(prep, capfd, tmp_path / "e", tmp_path / "mixed.jsonl", "--chat-template", endless),
        "the chat template writes nothing after an assistant's reply inside its turn",
    )
