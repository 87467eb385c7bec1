"""Tests for nasd.conf, the parser for the nats-server configuration file syntax."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nasd.conf import MAX_INCLUDE_DEPTH, ConfigSyntaxError, parse, parse_file

NO_ENVIRONMENT: dict[str, str] = {}


def parse_text(text: str, environ: dict[str, str] | None = None) -> dict:
    """Parse `text` with an empty environment unless one is given."""
    return parse(text, environ=NO_ENVIRONMENT if environ is None else environ)


def parse_error(text: str, environ: dict[str, str] | None = None, filename: str = "<string>") -> ConfigSyntaxError:
    """Return the ConfigSyntaxError that parsing `text` raises."""
    with pytest.raises(ConfigSyntaxError) as caught:
        parse(text, filename, environ=NO_ENVIRONMENT if environ is None else environ)
    return caught.value


# Error type.


def test_error_string_has_location() -> None:
    error = parse_error('a: 1\nkey: "x\\ub"\n', filename="/etc/nasd/nas.conf")
    expected = (
        "/etc/nasd/nas.conf:2:8: invalid escape character 'u' in a double-quoted string; "
        'allowed: \\xHH, \\t, \\n, \\r, \\", \\\\'
    )
    assert str(error) == expected


def test_error_attributes() -> None:
    error = parse_error("a: 1\n  b: $NOPE\n", filename="x.conf")
    assert error.filename == "x.conf"
    assert error.line == 2
    assert error.column == 6
    assert error.message == "variable reference $NOPE is not defined (no earlier key and no environment variable)"


def test_error_is_value_error() -> None:
    assert issubclass(ConfigSyntaxError, ValueError)


# Structure: separators, maps, terminators.


def test_separator_equals() -> None:
    assert parse_text("foo = 2") == {"foo": 2}


def test_separator_colon() -> None:
    assert parse_text("foo: 2") == {"foo": 2}


def test_separator_colon_without_space() -> None:
    assert parse_text("foo:2") == {"foo": 2}


def test_separator_whitespace() -> None:
    assert parse_text("foo 2") == {"foo": 2}


def test_separator_tab() -> None:
    assert parse_text("foo\t2") == {"foo": 2}


def test_map_without_separator() -> None:
    assert parse_text("authorization { token: x }") == {"authorization": {"token": "x"}}


def test_map_with_separator() -> None:
    assert parse_text("authorization: { token = x }") == {"authorization": {"token": "x"}}


def test_map_brace_on_next_line() -> None:
    assert parse_text("authorization\n{\n  token: x\n}\n") == {"authorization": {"token": "x"}}


def test_map_brace_glued_to_key() -> None:
    assert parse_text("authorization{ token: x }") == {"authorization": {"token": "x"}}


def test_map_entries_comma_semicolon_newline() -> None:
    result = parse_text("m { a: 1, b: 2; c: 3\n d: 4 }")
    assert result == {"m": {"a": 1, "b": 2, "c": 3, "d": 4}}


def test_map_trailing_comma() -> None:
    assert parse_text("m { a: 1, }") == {"m": {"a": 1}}


def test_map_empty() -> None:
    assert parse_text("m {}") == {"m": {}}


def test_map_nested() -> None:
    assert parse_text("a { b { c { d: 1 } } }") == {"a": {"b": {"c": {"d": 1}}}}


def test_top_level_terminators() -> None:
    assert parse_text("a: 1; b: 2, c: 3\nd: 4") == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_top_level_semicolon_then_comment() -> None:
    assert parse_text("max_pending 100m;   # note\nx: 1") == {
        "max_pending": 100000000,
        "x": 1,
    }


def test_top_level_braces() -> None:
    assert parse_text('{\n  "a": 1,\n  "b": "x"\n}\n') == {"a": 1, "b": "x"}


def test_top_level_braces_trailing_comma() -> None:
    assert parse_text('{ "a": 1, }') == {"a": 1}


def test_top_level_braces_comment_after() -> None:
    assert parse_text("# before\n{ a: 1 }\n# after\n") == {"a": 1}


def test_top_level_braces_unclosed() -> None:
    error = parse_error("\n  { a: 1\n")
    assert error.line == 2
    assert error.column == 3
    assert "not closed" in error.message


def test_top_level_braces_text_after() -> None:
    error = parse_error("{ a: 1 }\nb: 2\n")
    assert error.line == 2
    assert error.column == 1
    assert "after the '}'" in error.message


def test_top_level_stray_closing_brace() -> None:
    error = parse_error("a: 1\n}\n")
    assert error.line == 2
    assert error.column == 1
    assert "no open map" in error.message


def test_empty_text() -> None:
    assert parse_text("") == {}


def test_only_comments() -> None:
    assert parse_text("# one\n// two\n\n   \n") == {}


def test_crlf_line_endings() -> None:
    assert parse_text("a: 1\r\nb: x\r\nm {\r\n  c: 2\r\n}\r\n") == {
        "a": 1,
        "b": "x",
        "m": {"c": 2},
    }


# Keys.


def test_key_case_preserved() -> None:
    result = parse_text("Server_Name: a\nserver_name: b")
    assert result == {"Server_Name": "a", "server_name": "b"}


def test_key_double_quoted() -> None:
    assert parse_text('"my key": 1') == {"my key": 1}


def test_key_single_quoted() -> None:
    assert parse_text("'my key' 1") == {"my key": 1}


def test_key_quoted_without_escapes() -> None:
    assert parse_text('"a\\x62": 1') == {"a\\x62": 1}


def test_key_duplicate_last_wins() -> None:
    assert parse_text("foo: 1\nfoo: 2") == {"foo": 2}


def test_key_duplicate_variable_sees_last() -> None:
    assert parse_text("foo: 1\nfoo: 2\nbar: $foo")["bar"] == 2


def test_key_without_value_at_end() -> None:
    error = parse_error("a: 1\nlonely\n")
    assert error.line == 2
    assert error.column == 1
    assert error.message == "key 'lonely' has no value"


def test_key_separator_then_newline() -> None:
    error = parse_error("a =\n2\n")
    assert error.line == 1
    assert error.column == 4
    assert "missing value for key 'a'" in error.message


def test_key_separator_then_end() -> None:
    error = parse_error("a: ")
    assert error.line == 1
    assert error.column == 4
    assert "missing value for key 'a'" in error.message


def test_key_starting_with_comma() -> None:
    error = parse_error("m { a: 1,, b: 2 }")
    assert error.line == 1
    assert error.column == 10
    assert "expected a key" in error.message


def test_value_followed_by_junk() -> None:
    error = parse_error("a: 1 b: 2")
    assert error.line == 1
    assert error.column == 6
    assert "after the value of 'a'" in error.message


def test_two_quoted_values() -> None:
    error = parse_error('a: "x" "y"')
    assert error.column == 8


def test_map_unclosed() -> None:
    error = parse_error("a: 1\nauth {\n  token: x\n")
    assert error.line == 2
    assert error.column == 6
    assert error.message == "map is not closed with '}' before the end of the file"


def test_error_inside_nested_map() -> None:
    error = parse_error("auth {\n  users {\n    bad: .5\n  }\n}\n")
    assert error.line == 3
    assert error.column == 10


# Arrays.


def test_array_commas() -> None:
    assert parse_text("a: [1, 2, 3]") == {"a": [1, 2, 3]}


def test_array_newlines() -> None:
    assert parse_text("a: [\n  1\n  2\n]") == {"a": [1, 2]}


def test_array_comments_inside() -> None:
    text = "a: [ # first\n  x,  // second\n  y   # third\n]\n"
    assert parse_text(text) == {"a": ["x", "y"]}


def test_array_trailing_comma() -> None:
    assert parse_text("a: [x, y,]") == {"a": ["x", "y"]}


def test_array_empty() -> None:
    assert parse_text("a: []") == {"a": []}


def test_array_nested_and_maps() -> None:
    text = "users = [\n  {user: a, password: b}\n  {user: c, password: d}\n]\nlists: [[1], [2, 3]]"
    result = parse_text(text)
    assert result["users"] == [
        {"user": "a", "password": "b"},
        {"user": "c", "password": "d"},
    ]
    assert result["lists"] == [[1], [2, 3]]


def test_array_leading_comma() -> None:
    error = parse_error("a: 1\nb: [, x]\n")
    assert error.line == 2
    assert error.column == 5
    assert "unexpected ','" in error.message


def test_array_double_comma() -> None:
    error = parse_error("b: [x,, y]")
    assert error.column == 7


def test_array_comma_on_next_line() -> None:
    error = parse_error("b: [x\n, y]")
    assert error.line == 2
    assert error.column == 1


def test_array_semicolon_rejected() -> None:
    error = parse_error("b: [x; y]")
    assert error.column == 6
    assert "after an array item" in error.message


def test_array_unclosed() -> None:
    error = parse_error("a: 1\nb: [x, y\n")
    assert error.line == 2
    assert error.column == 4
    assert error.message == "array is not closed with ']' before the end of the file"


def test_array_item_missing_value() -> None:
    error = parse_error("b: [x,\n")
    assert error.line == 1
    assert error.column == 4


# Comments.


def test_comment_hash() -> None:
    assert parse_text("# comment\na: 1 # trailing") == {"a": 1}


def test_comment_slashes() -> None:
    assert parse_text("// comment\na: 1 // trailing") == {"a": 1}


def test_comment_after_quoted_value_glued() -> None:
    assert parse_text('a: "x"#c\nb: "y"//c') == {"a": "x", "b": "y"}


def test_comment_after_map_and_array() -> None:
    assert parse_text("m { a: 1 } # c\nl: [1]# c") == {"m": {"a": 1}, "l": [1]}


def test_comment_glued_to_unquoted_value() -> None:
    assert parse_text("server_name: abc#def//x") == {"server_name": "abc#def//x"}


def test_comment_hash_starts_value() -> None:
    assert parse_text("a: #abc") == {"a": "#abc"}


# Double-quoted strings.


def test_double_quoted_plain() -> None:
    assert parse_text('a: "hello world"') == {"a": "hello world"}


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        ("\\t", "\t"),
        ("\\n", "\n"),
        ("\\r", "\r"),
        ('\\"', '"'),
        ("\\\\", "\\"),
        ("\\x41", "A"),
        ("\\x6a", "j"),
        ("\\x6A", "j"),
    ],
)
def test_double_quoted_escape(escaped: str, expected: str) -> None:
    assert parse_text(f'a: "<{escaped}>"') == {"a": f"<{expected}>"}


def test_double_quoted_hex_escape_in_word() -> None:
    assert parse_text('a: "a\\x62c"') == {"a": "abc"}


def test_double_quoted_hex_utf8_sequence() -> None:
    assert parse_text('a: "caf\\xc3\\xa9"') == {"a": "caf\u00e9"}


def test_double_quoted_hex_invalid_utf8() -> None:
    error = parse_error('a: "\\xff"')
    assert "valid UTF-8" in error.message


def test_double_quoted_dollar_literal() -> None:
    assert parse_text('a: "$NOTAVAR"', environ={"NOTAVAR": "x"}) == {"a": "$NOTAVAR"}


def test_double_quoted_true_is_string() -> None:
    assert parse_text('a: "true"') == {"a": "true"}


def test_double_quoted_number_is_string() -> None:
    assert parse_text('a: "42"') == {"a": "42"}


def test_double_quoted_spans_lines() -> None:
    assert parse_text('a: "x\ny"') == {"a": "x\ny"}


def test_double_quoted_invalid_escape() -> None:
    error = parse_error('a: 1\nb: "xy\\q"\n')
    assert error.line == 2
    assert error.column == 7
    assert error.message.startswith("invalid escape character 'q' in a double-quoted string")


def test_double_quoted_bad_hex_digits() -> None:
    error = parse_error('a: "\\xZZ"')
    assert error.column == 5
    assert "two hexadecimal digits" in error.message


def test_double_quoted_short_hex() -> None:
    error = parse_error('a: "\\x4"')
    assert "two hexadecimal digits" in error.message


def test_double_quoted_unclosed() -> None:
    error = parse_error('a: 1\nb: "abc\n')
    assert error.line == 2
    assert error.column == 4
    assert error.message == "double-quoted string is not closed before the end of the file"


# Single-quoted strings.


def test_single_quoted_raw() -> None:
    assert parse_text("a: 'raw\\tsingle'") == {"a": "raw\\tsingle"}


def test_single_quoted_keeps_dollar_and_hash() -> None:
    assert parse_text("a: '$X # y'") == {"a": "$X # y"}


def test_single_quoted_unclosed() -> None:
    error = parse_error("a: 'abc\n")
    assert error.line == 1
    assert error.column == 4
    assert "single-quoted string is not closed" in error.message


# Unquoted strings.


def test_unquoted_url_value() -> None:
    text = "resolver: URL(http://127.0.0.1:9090/jwt/v1/accounts/)"
    assert parse_text(text) == {"resolver": "URL(http://127.0.0.1:9090/jwt/v1/accounts/)"}


def test_unquoted_host_port() -> None:
    assert parse_text("listen: 127.0.0.1:4222") == {"listen": "127.0.0.1:4222"}


def test_unquoted_contains_equals_and_quote() -> None:
    assert parse_text('a: x=y"z') == {"a": 'x=y"z'}


def test_unquoted_escape() -> None:
    assert parse_text("a: x\\ty") == {"a": "x\ty"}


def test_unquoted_invalid_escape() -> None:
    error = parse_error("a: x\\qy")
    assert error.column == 5
    assert error.message.startswith("invalid escape character 'q' in an unquoted string")


def test_unquoted_stops_at_terminators() -> None:
    result = parse_text("m { a: x, b: y; c: z}\nl: [p,q]")
    assert result == {"m": {"a": "x", "b": "y", "c": "z"}, "l": ["p", "q"]}


def test_unquoted_stops_at_single_quote() -> None:
    error = parse_error("a: abc'def'")
    assert error.column == 7


def test_unquoted_dot_start_rejected() -> None:
    error = parse_error("a: ./file")
    assert error.column == 4
    assert error.message.startswith("invalid value './file'")


# Block strings.


def test_block_string() -> None:
    assert parse_text("a: (\nline one\n  line two\n)\nb: 1") == {
        "a": "\nline one\n  line two\n",
        "b": 1,
    }


def test_block_string_paren_inside_line() -> None:
    assert parse_text("server_name: (\nab)c\n)\n") == {"server_name": "\nab)c\n"}


def test_block_string_indented_paren_ignored() -> None:
    assert parse_text("a: (\nx\n  )\n)\n") == {"a": "\nx\n  )\n"}


def test_block_string_text_on_first_line() -> None:
    assert parse_text("a: (x\n)") == {"a": "x\n"}


def test_block_string_keeps_comment_chars() -> None:
    assert parse_text("a: (\n# not a comment\n)") == {"a": "\n# not a comment\n"}


def test_block_string_unclosed() -> None:
    error = parse_error("a: 1\nb: (\nabc) \n")
    assert error.line == 2
    assert error.column == 4
    assert "block string is not closed" in error.message


def test_block_string_paren_suffix_ignored() -> None:
    error = parse_error("a: (\nabc\n)x\n")
    assert "block string is not closed" in error.message


# Booleans.


@pytest.mark.parametrize("word", ["true", "yes", "on", "TRUE", "Yes", "oN"])
def test_boolean_true(word: str) -> None:
    assert parse_text(f"a: {word}") == {"a": True}


@pytest.mark.parametrize("word", ["false", "no", "off", "FALSE", "No", "OFF"])
def test_boolean_false(word: str) -> None:
    assert parse_text(f"a: {word}") == {"a": False}


def test_boolean_single_quoted_is_string() -> None:
    assert parse_text("a: 'off'") == {"a": "off"}


def test_boolean_in_array() -> None:
    assert parse_text("a: [yes, no]") == {"a": [True, False]}


# Integers and floats.


def test_integer_plain() -> None:
    assert parse_text("a: 42") == {"a": 42}


def test_integer_negative() -> None:
    assert parse_text("a: -42") == {"a": -42}


def test_integer_leading_zeros() -> None:
    assert parse_text("a: 007") == {"a": 7}


def test_integer_type() -> None:
    assert type(parse_text("a: 1")["a"]) is int


@pytest.mark.parametrize(
    ("suffix", "multiplier"),
    [
        ("k", 1000),
        ("kb", 1024),
        ("ki", 1024),
        ("kib", 1024),
        ("m", 1000**2),
        ("mb", 1024**2),
        ("mi", 1024**2),
        ("mib", 1024**2),
        ("g", 1000**3),
        ("gb", 1024**3),
        ("gib", 1024**3),
        ("t", 1000**4),
        ("tb", 1024**4),
        ("tib", 1024**4),
        ("p", 1000**5),
        ("pb", 1024**5),
        ("pi", 1024**5),
        ("e", 1000**6),
        ("eb", 1024**6),
        ("eib", 1024**6),
    ],
)
def test_integer_size_suffix(suffix: str, multiplier: int) -> None:
    assert parse_text(f"a: 3{suffix}") == {"a": 3 * multiplier}


def test_integer_suffix_case_insensitive() -> None:
    result = parse_text("a: 2MB\nb: 1Kb\nc: 100M\nd: 1KiB")
    assert result["a"] == 2097152
    assert result["b"] == 1024
    assert result["c"] == 100000000
    assert result["d"] == 1024


def test_integer_negative_suffix() -> None:
    assert parse_text("a: -2k") == {"a": -2000}


def test_integer_int64_limits() -> None:
    result = parse_text("a: 9223372036854775807\nb: -9223372036854775808")
    assert result["a"] == 2**63 - 1
    assert result["b"] == -(2**63)


def test_integer_out_of_range() -> None:
    error = parse_error("a: 1\nb: 9223372036854775808\n")
    assert error.line == 2
    assert error.column == 4
    assert "outside the 64-bit signed integer range" in error.message


def test_integer_suffix_out_of_range() -> None:
    error = parse_error("a: 8eb")
    assert "outside the 64-bit signed integer range" in error.message


def test_float_plain() -> None:
    assert parse_text("a: 1.5\nb: -2.25") == {"a": 1.5, "b": -2.25}


def test_float_type() -> None:
    assert type(parse_text("a: 3.0")["a"]) is float


def test_float_leading_dot() -> None:
    error = parse_error("a: 1\nb: .5\n")
    assert error.line == 2
    assert error.column == 4
    assert "leading digit" in error.message


@pytest.mark.parametrize(
    "token",
    ["1s", "30s", "10.0.0.0/8", "1kx", "1b", "1.5s", "1_000", "0x10", "12abc", "1.2.3"],
)
def test_digit_token_is_string(token: str) -> None:
    assert parse_text(f"a: {token}") == {"a": token}


@pytest.mark.parametrize("token", ["-x", "-", "-5s", "-1.5.2"])
def test_minus_token_rejected(token: str) -> None:
    error = parse_error(f"a: {token}")
    assert error.column == 4
    assert error.message.startswith(f"invalid number '{token}'")


# Datetimes.


def test_datetime_zulu() -> None:
    value = parse_text("a: 2024-02-29T13:45:06Z")["a"]
    assert value == datetime.datetime(2024, 2, 29, 13, 45, 6, tzinfo=datetime.UTC)


def test_datetime_is_utc_aware() -> None:
    value = parse_text("a: 2024-02-29T13:45:06Z")["a"]
    assert value.utcoffset() == datetime.timedelta(0)


def test_datetime_invalid_month() -> None:
    error = parse_error("a: 2024-13-01T00:00:00Z")
    assert error.column == 4
    assert "invalid datetime" in error.message


def test_datetime_quoted_is_string() -> None:
    assert parse_text('a: "2024-02-29T13:45:06Z"') == {"a": "2024-02-29T13:45:06Z"}


# Variables.


def test_variable_earlier_key() -> None:
    assert parse_text("a: 5\nb: $a") == {"a": 5, "b": 5}


def test_variable_copies_map() -> None:
    result = parse_text("a { x: 1 }\nb: $a")
    result["b"]["x"] = 2
    assert result["a"] == {"x": 1}


def test_variable_block_scoped() -> None:
    result = parse_text('authorization {\n  TOK = "s3cr3t"\n  token: $TOK\n}')
    assert result["authorization"]["token"] == "s3cr3t"


def test_variable_block_not_visible_outside() -> None:
    error = parse_error("m { x: 1 }\ny: $x")
    assert error.line == 2
    assert error.column == 4


def test_variable_outer_visible_in_nested() -> None:
    result = parse_text("x: 1\nm { n { y: $x } }")
    assert result["m"]["n"]["y"] == 1


def test_variable_innermost_wins() -> None:
    result = parse_text("x: outer\nm { x: inner, y: $x }\nz: $x")
    assert result["m"]["y"] == "inner"
    assert result["z"] == "outer"


def test_variable_in_array() -> None:
    assert parse_text("x: 1\nl: [$x, {y: $x}]")["l"] == [1, {"y": 1}]


def test_variable_forward_reference() -> None:
    error = parse_error("a: $b\nb: 1", environ={})
    assert error.line == 1
    assert error.column == 4
    assert error.message == "variable reference $b is not defined (no earlier key and no environment variable)"


def test_variable_case_sensitive() -> None:
    error = parse_error("X: 1\ny: $x")
    assert error.message.startswith("variable reference $x is not defined")


def test_variable_key_before_environment() -> None:
    assert parse_text("a: key\nb: $a", environ={"a": "env"})["b"] == "key"


def test_variable_environment_string() -> None:
    assert parse_text("name: $SN", environ={"SN": "exp5"}) == {"name": "exp5"}


def test_variable_environment_int() -> None:
    assert parse_text("n: $MC", environ={"MC": "77"}) == {"n": 77}


def test_variable_environment_size() -> None:
    assert parse_text("n: $SIZE", environ={"SIZE": "2MB"}) == {"n": 2097152}


def test_variable_environment_bool() -> None:
    assert parse_text("n: $FLAG", environ={"FLAG": "true"}) == {"n": True}


def test_variable_environment_quoted() -> None:
    assert parse_text("n: $Q", environ={"Q": '"a b"'}) == {"n": "a b"}


def test_variable_environment_array() -> None:
    assert parse_text("n: $L", environ={"L": "[1, two]"}) == {"n": [1, "two"]}


def test_variable_environment_trailing_comment() -> None:
    assert parse_text("n: $S", environ={"S": "2MB # size"}) == {"n": 2097152}


def test_variable_environment_empty() -> None:
    assert parse_text("n: $E", environ={"E": ""}) == {"n": ""}


def test_variable_environment_chain() -> None:
    assert parse_text("n: $E", environ={"E": "$F", "F": "abc"}) == {"n": "abc"}


def test_variable_environment_ignores_keys() -> None:
    error = parse_error("x: 1\nn: $E", environ={"E": "$x"})
    assert error.line == 2
    assert error.column == 4
    assert "environment variable E cannot be parsed" in error.message


def test_variable_environment_invalid_value() -> None:
    error = parse_error("a: 1\nn: $E\n", environ={"E": "a b"})
    assert error.line == 2
    assert error.column == 4
    assert (
        error.message
        == "environment variable E cannot be parsed as a config value at column 3: unexpected 'b' after the value"
    )


def test_variable_environment_self_cycle() -> None:
    error = parse_error("a: 1\nn: $E1\n", environ={"E1": "$E1"})
    assert error.line == 2
    assert error.column == 4
    assert error.message == "variable reference $E1 is part of a cycle of environment variables: E1 -> E1"


def test_variable_environment_indirect_cycle() -> None:
    error = parse_error("n: $E", environ={"E": "$F", "F": "[$E]"})
    assert error.column == 4
    assert "E -> F -> E" in error.message


def test_variable_default_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NASD_CONF_TEST_VALUE", "12")
    assert parse("n: $NASD_CONF_TEST_VALUE") == {"n": 12}


def test_variable_not_defined_message() -> None:
    error = parse_error("a: 1\nb: $NOPE\n")
    assert (
        str(error)
        == "<string>:2:4: variable reference $NOPE is not defined (no earlier key and no environment variable)"
    )


def test_variable_without_name() -> None:
    error = parse_error("a: $")
    assert error.column == 4
    assert "no name" in error.message


def test_variable_bcrypt_literal() -> None:
    hashed = "$2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy"
    assert parse_text(f"password: {hashed}") == {"password": hashed}


def test_variable_single_quoted_literal() -> None:
    assert parse_text("a: '$X'", environ={"X": "1"}) == {"a": "$X"}


# Includes.


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_include_top_level(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "max_connections: 123\n")
    main = write(tmp_path / "main.conf", "a: 1\ninclude ./inc.conf\nb: 2\n")
    assert parse_file(str(main), NO_ENVIRONMENT) == {
        "a": 1,
        "max_connections": 123,
        "b": 2,
    }


def test_include_in_map(tmp_path: Path) -> None:
    write(tmp_path / "auth.conf", "token: abc\n")
    main = write(
        tmp_path / "main.conf",
        "authorization {\n  include auth.conf\n  timeout: 2\n}\n",
    )
    assert parse_file(str(main), NO_ENVIRONMENT) == {"authorization": {"token": "abc", "timeout": 2}}


def test_include_double_quoted(tmp_path: Path) -> None:
    write(tmp_path / "my inc.conf", "x: 1\n")
    main = write(tmp_path / "main.conf", 'include "my inc.conf"\n')
    assert parse_file(str(main), NO_ENVIRONMENT) == {"x": 1}


def test_include_single_quoted(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "x: 1\n")
    main = write(tmp_path / "main.conf", "include 'inc.conf'; y: 2\n")
    assert parse_file(str(main), NO_ENVIRONMENT) == {"x": 1, "y": 2}


def test_include_keyword_case_insensitive(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "x: 1\n")
    main = write(tmp_path / "main.conf", "INCLUDE inc.conf # comment\nInclude\tinc.conf\n")
    assert parse_file(str(main), NO_ENVIRONMENT) == {"x": 1}


def test_include_with_colon_is_key() -> None:
    assert parse_text("include: inc.conf") == {"include": "inc.conf"}


def test_include_quoted_keyword_is_key() -> None:
    assert parse_text('"include" inc.conf') == {"include": "inc.conf"}


def test_include_relative_to_including_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "sub").mkdir()
    write(tmp_path / "conf.d" / "sub" / "leaf.conf", "leaf: yes\n")
    write(tmp_path / "conf.d" / "middle.conf", "include sub/leaf.conf\nmiddle: 1\n")
    main = write(tmp_path / "main.conf", "include conf.d/middle.conf\n")
    assert parse_file(str(main), NO_ENVIRONMENT) == {"leaf": True, "middle": 1}


def test_include_from_string_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "inc.conf", "x: 1\n")
    monkeypatch.chdir(tmp_path)
    assert parse("include inc.conf", environ=NO_ENVIRONMENT) == {"x": 1}


def test_include_keys_become_variables(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "port: 4222\n")
    main = write(tmp_path / "main.conf", "include inc.conf\ncopy: $port\n")
    assert parse_file(str(main), NO_ENVIRONMENT)["copy"] == 4222


def test_include_cannot_see_outer_keys(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "y: $x\n")
    main = write(tmp_path / "main.conf", "x: 1\ninclude inc.conf\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), NO_ENVIRONMENT)
    assert caught.value.filename == str(tmp_path / "inc.conf")


def test_include_later_key_wins(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "x: 2\n")
    main = write(tmp_path / "main.conf", "x: 1\ninclude inc.conf\n")
    assert parse_file(str(main), NO_ENVIRONMENT) == {"x": 2}


def test_include_missing_file(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "a: 1\n  include nope.conf\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), NO_ENVIRONMENT)
    error = caught.value
    assert error.filename == str(main)
    assert error.line == 2
    assert error.column == 3
    assert "cannot read include file 'nope.conf'" in error.message
    assert str(tmp_path / "nope.conf") in error.message


def test_include_error_names_included_file(tmp_path: Path) -> None:
    included = write(tmp_path / "inc.conf", "ok: 1\nbad: [,]\n")
    main = write(tmp_path / "main.conf", "include inc.conf\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), NO_ENVIRONMENT)
    error = caught.value
    assert error.filename == str(included)
    assert error.line == 2
    assert error.column == 7


def test_include_self_loop(tmp_path: Path) -> None:
    main = write(tmp_path / "main.conf", "a: 1\ninclude main.conf\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), NO_ENVIRONMENT)
    error = caught.value
    assert error.filename == str(main)
    assert error.line == 2
    assert "includes itself" in error.message


def test_include_indirect_loop(tmp_path: Path) -> None:
    write(tmp_path / "a.conf", "include b.conf\n")
    write(tmp_path / "b.conf", "include a.conf\n")
    main = write(tmp_path / "main.conf", "include a.conf\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(main), NO_ENVIRONMENT)
    error = caught.value
    assert error.filename == str(tmp_path / "b.conf")
    assert "includes itself" in error.message


def test_include_loop_from_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.conf", "include a.conf\n")
    monkeypatch.chdir(tmp_path)
    error = parse_error("include a.conf")
    assert "includes itself" in error.message


def test_include_depth_limit(tmp_path: Path) -> None:
    for level in range(MAX_INCLUDE_DEPTH + 1):
        write(tmp_path / f"level{level}.conf", f"include level{level + 1}.conf\n")
    write(tmp_path / f"level{MAX_INCLUDE_DEPTH + 1}.conf", "deep: 1\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(tmp_path / "level0.conf"), NO_ENVIRONMENT)
    assert f"more than {MAX_INCLUDE_DEPTH} includes deep" in caught.value.message


def test_include_depth_at_limit_allowed(tmp_path: Path) -> None:
    for level in range(MAX_INCLUDE_DEPTH):
        write(tmp_path / f"level{level}.conf", f"include level{level + 1}.conf\n")
    write(tmp_path / f"level{MAX_INCLUDE_DEPTH}.conf", "deep: 1\n")
    assert parse_file(str(tmp_path / "level0.conf"), NO_ENVIRONMENT) == {"deep": 1}


def test_include_path_starting_with_digit() -> None:
    error = parse_error("include 1.conf")
    assert error.column == 9
    assert error.message == "include path cannot start with '1' unless it is quoted"


def test_include_without_path() -> None:
    error = parse_error("a: 1\ninclude \n")
    assert error.line == 2
    assert error.column == 1
    assert "no file path" in error.message


def test_nesting_depth_limit() -> None:
    error = parse_error("a: " + "[" * 200 + "]" * 200)
    assert error.line == 1
    assert error.column == 104
    assert "nested more than 100 levels" in error.message


def test_nesting_depth_below_limit() -> None:
    value = parse_text("a: " + "{b: " * 50 + "1" + "}" * 50)["a"]
    for _ in range(49):
        value = value["b"]
    assert value == {"b": 1}


# parse_file.


def test_parse_file_missing_main_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        parse_file(str(tmp_path / "missing.conf"), NO_ENVIRONMENT)


def test_parse_file_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.conf"
    path.write_bytes(b"\xef\xbb\xbfa: 1\n")
    assert parse_file(str(path), NO_ENVIRONMENT) == {"a": 1}


def test_parse_file_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(path), NO_ENVIRONMENT)
    assert caught.value.line == 2
    assert caught.value.column == 7


def test_parse_file_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.conf", "a: [\n")
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(path), NO_ENVIRONMENT)
    assert str(caught.value).startswith(f"{path}:1:4: ")


# Two configs whose values were checked against nats-server 2.15.1 and its /varz endpoint.

TRICKY_FLAT = """\
# hash comment
// slash comment
listen = 127.0.0.1:14224        # unquoted ip:port string, '=' separator
http: "127.0.0.1:18224"          // quoted, ':' separator
server_name $SN                  # space separator + env variable reference   (SN=exp5 -> "exp5")
max_payload: 2MB                 # 2097152
max_pending 100m;                # 100000000, optional ';'
ping_interval: "30s"; ping_max: 3
include ./inc.conf               # file contains: max_connections: 123
server_tags: [ a, "b c", 'd',
  e   # newline separates array items too
]
authorization {
  TOK = "s3cr3t"                 # block-scoped variable
  token: $TOK
}
"""

TRICKY_JSON = """\
{
  "listen": "127.0.0.1:14224",
  "http": "127.0.0.1:18224",
  "max_connections": $MC,          # MC=77 in env -> integer 77
  "server_name": "a\\x62c",         # -> "abc"
  "max_payload": 1Kb,              # -> 1024
  "server_tags": ["tab\\there", 'raw\\tsingle', "$NOTAVAR", (
line one
  line two
)
  ],
}
"""


@pytest.fixture
def tricky_flat(tmp_path: Path) -> dict:
    write(tmp_path / "inc.conf", "max_connections: 123\n")
    main = write(tmp_path / "main.conf", TRICKY_FLAT)
    return parse_file(str(main), {"SN": "exp5"})


@pytest.fixture
def tricky_json(tmp_path: Path) -> dict:
    main = write(tmp_path / "json.conf", TRICKY_JSON)
    return parse_file(str(main), {"MC": "77"})


def test_tricky_flat_listen(tricky_flat: dict) -> None:
    assert tricky_flat["listen"] == "127.0.0.1:14224"


def test_tricky_flat_http(tricky_flat: dict) -> None:
    assert tricky_flat["http"] == "127.0.0.1:18224"


def test_tricky_flat_server_name(tricky_flat: dict) -> None:
    assert tricky_flat["server_name"] == "exp5"


def test_tricky_flat_max_payload(tricky_flat: dict) -> None:
    assert tricky_flat["max_payload"] == 2097152


def test_tricky_flat_max_pending(tricky_flat: dict) -> None:
    assert tricky_flat["max_pending"] == 100000000


def test_tricky_flat_ping(tricky_flat: dict) -> None:
    assert tricky_flat["ping_interval"] == "30s"
    assert tricky_flat["ping_max"] == 3


def test_tricky_flat_include(tricky_flat: dict) -> None:
    assert tricky_flat["max_connections"] == 123


def test_tricky_flat_tags(tricky_flat: dict) -> None:
    assert tricky_flat["server_tags"] == ["a", "b c", "d", "e"]


def test_tricky_flat_authorization(tricky_flat: dict) -> None:
    assert tricky_flat["authorization"] == {"TOK": "s3cr3t", "token": "s3cr3t"}


def test_tricky_flat_keys(tricky_flat: dict) -> None:
    expected = [
        "listen",
        "http",
        "server_name",
        "max_payload",
        "max_pending",
        "ping_interval",
        "ping_max",
        "max_connections",
        "server_tags",
        "authorization",
    ]
    assert list(tricky_flat) == expected


def test_tricky_json_addresses(tricky_json: dict) -> None:
    assert tricky_json["listen"] == "127.0.0.1:14224"
    assert tricky_json["http"] == "127.0.0.1:18224"


def test_tricky_json_max_connections(tricky_json: dict) -> None:
    assert tricky_json["max_connections"] == 77


def test_tricky_json_server_name(tricky_json: dict) -> None:
    assert tricky_json["server_name"] == "abc"


def test_tricky_json_max_payload(tricky_json: dict) -> None:
    assert tricky_json["max_payload"] == 1024


def test_tricky_json_tags(tricky_json: dict) -> None:
    # The parser keeps case and whitespace. nats-server lower-cases and trims tags afterwards,
    # which gives "$notavar" and "line one\n  line two" in /varz.
    assert tricky_json["server_tags"] == [
        "tab\there",
        "raw\\tsingle",
        "$NOTAVAR",
        "\nline one\n  line two\n",
    ]


def test_tricky_json_tags_as_nats_server(tricky_json: dict) -> None:
    normalized = [tag.strip().lower() for tag in tricky_json["server_tags"]]
    assert normalized == [
        "tab\there",
        "raw\\tsingle",
        "$notavar",
        "line one\n  line two",
    ]


def test_tricky_json_keys(tricky_json: dict) -> None:
    assert list(tricky_json) == [
        "listen",
        "http",
        "max_connections",
        "server_name",
        "max_payload",
        "server_tags",
    ]


# Cross-check with the real nats-server, which only reads the files (`-t` tests the config and exits).


def find_nats_server() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which("nats-server")


NATS_SERVER = find_nats_server()


@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server binary not installed")
@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("server_name: abc#def//x\n", True),
        ("server_tags: [a,]\n", True),
        ("server_tags: [,a]\n", False),
        ('server_name: "a\\ub"\n', False),
        ("max_payload: .5\n", False),
        ("max_payload: 99999999999999999999\n", False),
        ("authorization {\n  token: x\n", False),
        ("server_name: (\nabc\n", False),
        ("server_name: $NASD_UNSET_VARIABLE_FOR_TEST\n", False),
        ("{ server_name: x, }\n", True),
    ],
)
def test_nats_server_agrees(tmp_path: Path, text: str, accepted: bool) -> None:
    path = write(tmp_path / "check.conf", text)
    assert NATS_SERVER is not None
    completed = subprocess.run(
        [NATS_SERVER, "-c", str(path), "-t"],
        capture_output=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "")},
        check=False,
    )
    assert (completed.returncode == 0) is accepted

    if accepted:
        parse_file(str(path), NO_ENVIRONMENT)
    else:
        with pytest.raises(ConfigSyntaxError):
            parse_file(str(path), NO_ENVIRONMENT)


@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server binary not installed")
def test_nats_server_accepts_tricky_flat(tmp_path: Path) -> None:
    write(tmp_path / "inc.conf", "max_connections: 123\n")
    main = write(tmp_path / "main.conf", TRICKY_FLAT)
    assert NATS_SERVER is not None
    completed = subprocess.run(
        [NATS_SERVER, "-c", str(main), "-t"],
        capture_output=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), "SN": "exp5"},
        check=False,
    )
    assert completed.returncode == 0
