"""Answers a program can use: a document piped in with an instruction, replies that follow a JSON schema or a grammar,
and stop strings.

Grammars are checked on two kinds of model: random weights, which say anything at all, so only the grammar can make
their replies parse; and the crafted puck-goal model, whose greedy reply is known ("puck puck puck"), so that what a
grammar or a stop string changes in it is known to the token.
"""
from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from conftest import RANDOM, console, crafted, flags, the_error
from phi3_models import token_id

ENUM_AND_BOOLEAN = json.dumps({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                                "ok": {"type": "boolean"}},
                               "required": ["color", "ok"], "additionalProperties": False})
WORDS = 'root ::= word (" " word){2,4}\nword ::= "hello" | "world" | "ice"\n'  # GBNF: three to five of these words
GOAL_GOAL_PUCK = 'root ::= " goal" " goal" " puck"\n'  # what the token pieces must spell: "▁goal" reads " goal"
DOCUMENT = " ".join(["hello world"] * 480)  # about 960 tokens: more than one 512-token batch


def random_model(**settings: object) -> list[str]:
    chosen = {"temperature": 1.0, "sample_len": 40, "prompt": "say something", **settings}
    return ["--model-repo", RANDOM, "--model-file", "two-layers.gguf", *flags(**chosen)]


@pytest.fixture
def random_home(hub, random_models, tmp_path_factory):
    """A cache that holds the random models and no saved prompt."""
    home = tmp_path_factory.getbasetemp() / "answers_home"
    if not home.exists():
        assert console(*random_model(sample_len=1, prompt_cache_gb=0), hub=hub, home=home).returncode == 0
    shutil.rmtree(home / "phi-console" / "prompts", ignore_errors=True)
    return home


def fed_tokens(result) -> str:
    """The prompt's tokens as --verbose shows them."""
    assert result.returncode == 0, result.stderr
    return re.search(r"^prompt: \d+ tokens \[.*\]$", result.stderr, re.M)[0]


# --- A document and an instruction ------------------------------------------------------------------------------------
def test_a_piped_document_comes_first_then_a_blank_line_then_the_instruction(hub, random_home):
    piped = console(*random_model(prompt="say something", seed=1), "--verbose", hub=hub, home=random_home,
                    stdin=b"hello world\nquick brown fox\n")
    typed = console(*random_model(prompt="hello world\nquick brown fox\n\nsay something", seed=1), "--verbose",
                    hub=hub, home=random_home)
    assert fed_tokens(piped) == fed_tokens(typed)
    assert piped.stdout == typed.stdout  # random weights: the reply depends on every token of the prompt


def test_without_an_instruction_the_pipe_is_the_whole_prompt_and_dash_reads_it_alone(hub, warm_home):
    alone = fed_tokens(console(*crafted(prompt="hello world"), "--verbose", hub=hub, home=warm_home))
    for prompt in (None, "-"):
        piped = console(*crafted(prompt=prompt), "--verbose", hub=hub, home=warm_home, stdin=b"hello world")
        assert fed_tokens(piped) == alone


def test_an_empty_pipe_leaves_the_instruction_alone(hub, warm_home):
    alone = fed_tokens(console(*crafted(prompt="say something"), "--verbose", hub=hub, home=warm_home))
    piped = console(*crafted(prompt="say something"), "--verbose", hub=hub, home=warm_home, stdin=b" \n")
    assert fed_tokens(piped) == alone


def test_a_second_instruction_over_the_same_document_restores_the_document_from_the_first(hub, random_home):
    first = console(*random_model(prompt="say something", sample_len=8), hub=hub, home=random_home,
                    stdin=DOCUMENT.encode())
    assert first.returncode == 0, first.stderr
    second = console(*random_model(prompt="write haiku", seed=3, sample_len=8), hub=hub, home=random_home,
                     stdin=DOCUMENT.encode())
    restored = int(re.search(r"prompt: \d+ tokens, (\d+) restored from an earlier run", second.stderr)[1])
    assert restored >= 512
    evaluated = console(*random_model(prompt="write haiku", seed=3, sample_len=8, prompt_cache_gb=0), hub=hub,
                        home=random_home, stdin=DOCUMENT.encode())
    assert second.stdout == evaluated.stdout  # the restored start is the document's own


# --- JSON that always parses, and other grammars ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_random_weights_under_a_schema_always_reply_json_that_fits_it(hub, random_home, seed):
    result = console(*random_model(seed=seed, json_schema=ENUM_AND_BOOLEAN), hub=hub, home=random_home)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)  # stdout is exactly the reply: `| jq .` works
    assert reply["color"] in ("red", "green", "blue") and isinstance(reply["ok"], bool) and len(reply) == 2


@pytest.mark.parametrize("seed", range(4))
def test_random_weights_under_a_grammar_file_always_reply_in_its_language(hub, random_home, tmp_path, seed):
    (tmp_path / "words.gbnf").write_text(WORDS)
    result = console(*random_model(seed=seed, grammar=tmp_path / "words.gbnf"), hub=hub, home=random_home)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"(hello|world|ice)( (hello|world|ice)){2,4}\n", result.text)


@pytest.mark.parametrize("seed", [0, 2, 3])  # seeds whose free reply has no "q" and no byte that is not UTF-8
def test_a_grammar_that_refuses_no_token_drawn_changes_no_draw(hub, random_home, tmp_path, seed):
    # As in llama.cpp's own loop, the chain draws from every token and the grammar checks only the token drawn. Were
    # the grammar applied first, the share of the tokens it refuses (here those with a "q") would be taken from the
    # draw, and the same random numbers would pick other tokens.
    free = console(*random_model(seed=seed, sample_len=24), hub=hub, home=random_home)
    assert "q" not in free.text and "\ufffd" not in free.text  # nothing the grammar below refuses was drawn
    (tmp_path / "g.gbnf").write_text("root ::= [^q]*\n")
    bound = console(*random_model(seed=seed, sample_len=24, grammar=tmp_path / "g.gbnf"), hub=hub, home=random_home)
    assert free.returncode == bound.returncode == 0, bound.stderr
    assert bound.stdout.lstrip(b" ") == free.stdout  # the grammar's reply keeps its first token's space


def test_a_grammar_redraws_only_what_it_refuses_and_the_reply_ends_where_it_is_complete(hub, warm_home, tmp_path):
    # Greedy says "puck"; the grammar refuses it twice, so "goal" (the next likeliest) is drawn instead; then it
    # allows "puck", and after that only the end: the reply ends there, long before --sample-len.
    (tmp_path / "g.gbnf").write_text(GOAL_GOAL_PUCK)
    result = console(*crafted(grammar=tmp_path / "g.gbnf"), hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b" goal goal puck\n"  # what the grammar accepted, the first token's space included
    assert "generated: 4 tokens" in result.stderr  # three words and the end


def test_a_reply_cut_short_before_its_grammar_is_complete_says_so_and_fails(hub, warm_home, tmp_path):
    (tmp_path / "g.gbnf").write_text(GOAL_GOAL_PUCK)
    result = console(*crafted(grammar=tmp_path / "g.gbnf", sample_len=2), hub=hub, home=warm_home)
    assert result.returncode == 3
    assert result.stdout == b" goal goal\n"  # what was generated stays
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "incomplete" in errors[0] and "raise --sample-len" in errors[0]


def test_a_stop_string_that_cuts_a_reply_before_its_grammar_is_complete_fails_too(hub, warm_home, tmp_path):
    (tmp_path / "g.gbnf").write_text(GOAL_GOAL_PUCK)
    result = console(*crafted(grammar=tmp_path / "g.gbnf"), "--stop", "l g", hub=hub, home=warm_home)
    assert result.returncode == 3 and result.stdout == b" goa\n"
    assert "a stop string ended it" in result.stderr


def test_a_schema_reply_cut_short_fails_too(hub, random_home):
    result = console(*random_model(seed=1, json_schema=ENUM_AND_BOOLEAN, sample_len=3), hub=hub, home=random_home)
    assert result.returncode == 3 and result.stdout.startswith(b"{")
    assert "incomplete" in result.stderr and "Traceback" not in result.stderr


def test_a_reply_that_completes_its_grammar_at_the_last_token_allowed_is_complete(hub, warm_home, tmp_path):
    (tmp_path / "g.gbnf").write_text(GOAL_GOAL_PUCK)
    result = console(*crafted(grammar=tmp_path / "g.gbnf", sample_len=3), hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b" goal goal puck\n"


GRAMMAR_FILES = {"unparsable": 'root ::= ("a" \n', "undefined rule": "root ::= word\n", "no root": 'start ::= "a"\n',
                 "empty": "\n"}
# Schemas llguidance cannot enforce, and the words the one error line must hold for each: refused, never loosened
REFUSED = {
    "oneOf whose schemas overlap": ('{"oneOf": [{"type": "integer"}, {"type": "number"}]}', "oneOf", "use anyOf"),
    "uniqueItems": ('{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}', "uniqueItems"),
    "a schema's own lenient option": ('{"uniqueItems": true, "x-guidance": {"lenient": true}}', "uniqueItems"),
    "NaN": ('{"const": NaN}', "NaN is not JSON"),
    "Infinity": ('{"enum": [1, -Infinity]}', "Infinity is not JSON"),
    "1e400": ('{"type": "number", "maximum": 1e400}', "1e400"),
    "minItems above maxItems": ('{"type": "array", "minItems": 3, "maxItems": 1}', "minItems (3)", "maxItems (1)"),
    "minLength above maxLength": ('{"type": "string", "minLength": 5, "maxLength": 2}', "minLength (5)"),
    "no integer in range": ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum (5)"),
    "look-behind in a pattern": ('{"type": "string", "pattern": "(?<=a)b"}', "look-behind"),
    "an unknown type": ('{"type": "frobnicator"}', "frobnicator"),
    "a $ref to nothing": ('{"$ref": "#/$defs/none"}', "does not exist"),
    "a $ref to the web": ('{"$ref": "https://example.com/s.json"}', "example.com"),
    "not JSON": ("{not json", "Expecting property name", "a file that holds it"),
    "a missing file": ("no/such/schema.json", "file no/such/schema.json", "No such file"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_schema_llguidance_cannot_enforce_is_refused_with_its_reason_before_any_download(hub, tmp_path, case):
    schema, *said = REFUSED[case]
    line = the_error(console("--json-schema", schema, hub=hub, home=tmp_path), code=2)
    assert line.startswith("error: the JSON schema") and all(words in line for words in said), line
    assert hub.requests == []


def test_a_schema_file_larger_than_a_command_line_holds_is_read_from_its_path(hub, phi3_vocab_model, vocab_home,
                                                                              tmp_path):
    # One argument holds at most 128 KB on Linux; real schemas (Kubernetes') are larger: the flag takes a file's name
    schema = {"description": "x" * 140_000, "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    (tmp_path / "big.json").write_text(json.dumps(schema))
    assert (tmp_path / "big.json").stat().st_size > 128 * 1024
    result = first_finished(phi3_vocab_model, vocab_home, hub, str(tmp_path / "big.json"))
    jsonschema.validate(json.loads(result.stdout), schema)


@pytest.mark.parametrize("case,flag,expected", [
    ("missing file", ["--grammar", "no/such/file.gbnf"], "No such file"),
    *((f"grammar: {name}", ["--grammar", name], "does not parse") for name in GRAMMAR_FILES),
    ("left recursion", ["--grammar", "left"], "left recursion detected"),
    ("nested too deep", ["--grammar", "deep"], "nests 100000 groups deep"),  # llama.cpp's parser would overflow
    ("both", ["--grammar", "empty", "--json-schema", "{}"], "both set"),
])
def test_a_schema_or_grammar_that_cannot_be_used_is_one_line_before_any_download(hub, tmp_path, monkeypatch, case,
                                                                               flag, expected):
    deep = f'root ::= {"(" * 100000}"a"{")" * 100000}\n'
    grammars = {**GRAMMAR_FILES, "left": 'root ::= root "a" | "b"\n', "deep": deep}
    for name, text in grammars.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    line = the_error(console(*flag, hub=hub, home=tmp_path / "home"), code=2)
    assert expected in line, line
    assert hub.requests == []  # refused before the hub was asked for anything


def test_a_grammar_that_names_an_unknown_token_is_refused_before_the_prompt(hub, warm_home, tmp_path):
    (tmp_path / "g.gbnf").write_text("root ::= <|no-such-token|>\n")  # needs the model's vocabulary to check
    line = the_error(console(*crafted(grammar=tmp_path / "g.gbnf"), hub=hub, home=warm_home), code=2)
    assert "does not parse" in line and "no-such-token" in line
    assert "prompt:" not in console(*crafted(grammar=tmp_path / "g.gbnf"), hub=hub, home=warm_home).stderr


# --- llama.cpp's own schemas, and hostile ones, on Phi-3's own vocabulary ---------------------------------------------
# The success cases of llama.cpp's converter tests (tests/test-json-schema-to-grammar.cpp in its source), kept in
# tests/llama_cpp_schemas.json. Each is refused before anything slow with one line, or answered: for each, a seed is
# tried after another until a reply finishes (exit 0), and that reply must be JSON that fits it, as the jsonschema
# library judges with its format checker: a reference nobody here wrote.
LLAMA_CPP_SCHEMAS = json.loads((Path(__file__).parent / "llama_cpp_schemas.json").read_text())
LLAMA_CPP_REFUSED = {  # what llguidance cannot enforce among them: the exact set, so that no refusal goes unnoticed
    "string array": "prefixItems must be an array",  # "prefixItems": {...}, not a list: no schema in 2020-12
    "nullable string array": "prefixItems must be an array",
    "array with empty items and prefixItems": "prefixItems must be an array",
    "unsupported regexp in a property": "look-around",
}
SEEDS = 8  # seeds tried, two at a time, until one reply finishes (random weights rarely close a string)
# Schemas written to catch a converter out, each refused with its reason or answered with a reply that fits
HOSTILE = {
    "a $ref named like a rule": {"$defs": {"space": {"type": "integer"}}, "type": "object",
                                 "properties": {"x": {"$ref": "#/$defs/space"}}, "required": ["x"]},
    "a $ref named like a format": {"$defs": {"date": {"type": "integer"}}, "type": "object", "required": ["d", "n"],
                                   "properties": {"d": {"type": "string", "format": "date"},
                                                  "n": {"$ref": "#/$defs/date"}}},
    "two $refs ending alike": {"$defs": {"Person": {"properties": {"name": {"type": "string", "maxLength": 3}}},
                                         "Pet": {"properties": {"name": {"type": "integer"}}}},
                               "type": "object", "required": ["a", "b"],
                               "properties": {"a": {"$ref": "#/$defs/Person/properties/name"},
                                              "b": {"$ref": "#/$defs/Pet/properties/name"}}},
    "a $ref to a $ref": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "boolean"}}, "$ref": "#/$defs/a"},
    "a property named $ref": {"type": "object", "properties": {"$ref": {"type": "integer"}}, "required": ["$ref"]},
    "a $ref inside a const": {"type": "object", "properties": {"k": {"const": {"$ref": "#/$defs/x"}}},
                              "required": ["k"], "$defs": {"x": {"type": "integer"}}},
    "a $ref inside an enum": {"enum": [{"$ref": "#"}, 1]},
    "anchors in alternatives": {"type": "string", "pattern": "^a$|^b$"},
    "an anchor inside a group": {"type": "string", "pattern": "^(x$|y)z$"},
    "a lazy repeat": {"type": "string", "pattern": "^a+?b$"},
    "escapes in a pattern": {"type": "string", "pattern": "^\\d{2}\\.\\d\\/[a-z]$"},
    "an unanchored pattern": {"type": "string", "pattern": "ab", "maxLength": 6},
    "a date": {"type": "string", "format": "date"},
    "a short string": {"type": "string", "minLength": 2, "maxLength": 4},
    "sixteen nines": {"type": "integer", "minimum": 0, "maximum": 9999999999999999},
    "extra properties allowed": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    "properties named like keywords": {"type": "object", "required": ["format", "pattern"],
                                       "properties": {"format": {"type": "string", "format": "date"},
                                                      "pattern": {"type": "string", "pattern": "^[ab]$"}}},
    "Phi-3's [PAD] tokens spell the pattern": {"type": "string", "pattern": "^\\[[A-Z0-9]+\\]$"},
    "[PAD] tokens fill a length": {"type": "string", "minLength": 12, "maxLength": 14},
}
MUST_ACCEPT = {"a $ref to a $ref", "a property named $ref", "escapes in a pattern", "sixteen nines",
               "properties named like keywords",
               "Phi-3's [PAD] tokens spell the pattern"}  # refusing these would be needless


@pytest.fixture(scope="module")
def vocab_home(hub, phi3_vocab_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("vocab_home")
    assert console(*phi3_vocab_model, "--sample-len", "1", "--prompt-cache-gb", "0", hub=hub, home=home).returncode == 0
    return home


def first_finished(model, home, hub, schema: str):
    """The first reply to the schema that finishes, trying seeds two at a time; refused (exit 2) is returned at once."""
    def reply(seed: int):
        return console(*model, *flags(temperature=1.0, sample_len=2048, seed=seed, prompt="JSON please",
                                      json_schema=schema), hub=hub, home=home)

    with ThreadPoolExecutor(2) as pool:
        for pair in range(0, SEEDS, 2):
            for result in pool.map(reply, range(pair, pair + 2)):
                assert "Traceback" not in result.stderr and result.returncode in (0, 2, 3), result.stderr
                if result.returncode in (0, 2):
                    return result
    pytest.fail(f"no reply of {SEEDS} finished: {result.stderr}")


def fits(result, schema: dict) -> None:
    """A finished reply is one line of JSON that fits the schema, formats included."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n") and b"\n" not in result.stdout[:-1]  # the JSON, then one newline
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    validator.validate(json.loads(result.stdout))


@pytest.mark.parametrize("case", LLAMA_CPP_SCHEMAS, ids=[case["name"] for case in LLAMA_CPP_SCHEMAS])
def test_llama_cpp_s_own_schemas_are_refused_with_a_reason_or_answered_with_json_that_fits(hub, phi3_vocab_model,
                                                                                           vocab_home, case):
    result = first_finished(phi3_vocab_model, vocab_home, hub, case["schema"])
    if case["name"] in LLAMA_CPP_REFUSED:
        line = the_error(result, code=2)
        assert line.startswith("error: the JSON schema cannot be used") and LLAMA_CPP_REFUSED[case["name"]] in line
        assert "loaded in" not in result.stderr  # before the model was loaded
    else:
        fits(result, json.loads(case["schema"]))


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_schema_is_refused_with_a_reason_or_answered_with_json_that_fits(hub, phi3_vocab_model,
                                                                                  vocab_home, case):
    result = first_finished(phi3_vocab_model, vocab_home, hub, json.dumps(HOSTILE[case]))
    if result.returncode == 2 and case not in MUST_ACCEPT:
        assert the_error(result, code=2).startswith("error: the JSON schema cannot be used")
    else:
        fits(result, HOSTILE[case])


# --- Grammars that llama.cpp cannot finish: a reply and one line, never a crash ---------------------------------------
DEAD_ENDS = {  # grammars that ask for what no reply can hold: llama.cpp would throw, and abort the process, on them
    "a special token after text": ('root ::= "hi" <|end|>\n', b"hi\n"),
    "a token id the model lacks": ("root ::= <[40000]>\n", b"\n"),
    "a byte token": ("root ::= <[3]>\n", b"\n"),
    "a NUL": ('root ::= "\\x00"\n', b"\n"),
}


@pytest.mark.parametrize("case", DEAD_ENDS)
def test_a_grammar_no_reply_can_finish_ends_the_reply_with_one_line(hub, phi3_vocab_model, vocab_home, tmp_path, case):
    grammar, printed = DEAD_ENDS[case]
    (tmp_path / "g.gbnf").write_text(grammar)
    for seed in range(2):
        result = console(*phi3_vocab_model, *flags(temperature=1.0, sample_len=5, seed=seed, prompt="hello",
                                                   grammar=tmp_path / "g.gbnf"), hub=hub, home=vocab_home)
        assert result.returncode == 3, result.stderr
        assert result.stdout == printed  # what the grammar accepted, and nothing of a crash handler's
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the grammar allows no token after it" in errors[0], result.stderr


@pytest.mark.parametrize("seed", range(5))
def test_a_grammar_never_takes_a_special_token_as_its_text(hub, phi3_vocab_model, vocab_home, tmp_path, seed):
    # "<|placeholder6|>" spells "<" [^>]+ ">" to llama.cpp's grammar, but is printed as nothing
    (tmp_path / "g.gbnf").write_text('root ::= "<" [^>]+ ">"\n')
    result = console(*phi3_vocab_model, *flags(temperature=1.0, sample_len=24, seed=seed, prompt="hello",
                                               grammar=tmp_path / "g.gbnf"), hub=hub, home=vocab_home)
    assert result.returncode in (0, 3), result.stderr
    if result.returncode == 0:
        assert re.fullmatch(rb"<[^>]+>\n", result.stdout, re.S), result.stdout
    assert result.stdout.startswith(b"<")


@pytest.mark.parametrize("seed", range(3))
def test_what_a_grammar_accepts_is_printed_its_first_space_included(hub, phi3_vocab_model, vocab_home, tmp_path,
                                                                     seed):
    (tmp_path / "g.gbnf").write_text('root ::= " " ("yes" | "no")\n')
    result = console(*phi3_vocab_model, *flags(temperature=1.0, sample_len=8, seed=seed, prompt="yes or no?",
                                               grammar=tmp_path / "g.gbnf"), hub=hub, home=vocab_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout in (b" yes\n", b" no\n")


def test_in_a_chat_a_grammar_no_reply_can_finish_costs_that_reply_only(hub, phi3_vocab_model, vocab_home, tmp_path):
    (tmp_path / "g.gbnf").write_text('root ::= "hi" <|end|>\n')
    typed = f"/set grammar {tmp_path / 'g.gbnf'}\nhello\n/set grammar none\n/set sample_len 3\nhello again\n"
    result = console(*phi3_vocab_model, "--chat", "--seed", "1", hub=hub, home=vocab_home, stdin=typed.encode())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split(b"\n")
    assert lines[0] == b"hi" and len(lines) == 3 and lines[1] != b""  # the next message still has its reply
    assert "the grammar allows no token after it" in result.stderr and "Traceback" not in result.stderr


# --- Stop strings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stops,penalty,reply", [
    (["uc"], 1.0, b"p"),  # inside one token: "puck"
    (["ck pu"], 1.0, b"pu"),  # across two tokens: "puck" " puck"
    (["k puck p"], 1.0, b"puc"),  # across three
    (["goal", "k g"], 1.2, b"puc"),  # "puck goal puck": the one that comes first in the reply wins
    (["k g", "goal"], 1.2, b"puc"),
    (["pu"], 1.0, b""),  # at the very start: an empty reply
    (["puck!"], 1.0, b"puck puck puck"),  # never reached: what was held back is printed at the end
    (['["ck pu", "zz"]'], 1.0, b"pu"),  # a JSON list types several at once
])
def test_the_reply_ends_just_before_the_first_stop_string_and_none_of_it_is_printed(hub, warm_home, stops, penalty,
                                                                                    reply):
    stop_flags = [x for stop in stops for x in ("--stop", stop)]
    result = console(*crafted(repeat_penalty=penalty, sample_len=3), *stop_flags, hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply + b"\n"


def test_text_held_back_when_the_model_ends_the_reply_is_printed(hub, warm_home, tmp_path):
    # The last " puck" could begin "puck!" and is held back, until the end of generation shows it never will
    (tmp_path / "g.gbnf").write_text(GOAL_GOAL_PUCK)
    result = console(*crafted(grammar=tmp_path / "g.gbnf"), "--stop", "puck!", hub=hub, home=warm_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b" goal goal puck\n"


def test_an_empty_stop_string_is_refused(tmp_path):
    assert "must be non-empty texts" in the_error(console("--stop", "", hub=None, home=tmp_path), code=2)


# --- In a chat --------------------------------------------------------------------------------------------------------
def test_in_a_chat_the_conversation_keeps_only_what_was_printed(hub, warm_home, tmp_path):
    typed = f"hello\n/save {tmp_path / 'talk.json'}\nhello again\n/save {tmp_path / 'later.json'}\n"
    result = console(*crafted(prompt=None, sample_len=3), "--chat", "--stop", "ck pu", hub=hub, home=warm_home,
                     stdin=typed.encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"pu\npu\n"
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert saved["messages"][1] == {"role": "assistant", "content": "pu"}
    context = saved["context"]["tokens"] + saved["context"]["pending"]
    assert context[-2:] == [token_id("▁pu"), 32007]  # the printed reply, then <|end|>: no "puck" drawn after it
    later = json.loads((tmp_path / "later.json").read_text())["context"]
    assert later["tokens"][:len(context)] == context  # the next exchange evaluated it as it was recorded


def test_in_a_chat_a_schema_applies_to_the_following_replies_and_a_bad_one_changes_nothing(hub, warm_home, tmp_path):
    missing = tmp_path / "missing.gbnf"
    typed = (f'/set json_schema {{"enum": ["red", "blue"]}}\nhello\n/set grammar {missing}\n/set json_schema none\n'
             f"/set grammar {missing}\n/show\nhello\n")
    result = console(*crafted(prompt=None, sample_len=8), "--chat", hub=hub, home=warm_home, stdin=typed.encode())
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.decode().splitlines()
    assert json.loads(first) in ("red", "blue")
    assert second == "puck puck puck puck puck puck puck puck"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "both set" in errors[0] and "No such file" in errors[1] and len(errors) == 2
    assert "grammar = None" in result.stderr  # /show: the missing grammar file was not taken
