"""Parser for the nats-server configuration file syntax, which nasd uses for its own config file.

The syntax rules follow the `conf` package of nats-server 2.10 to 2.15, and NOTE comments mark the differences.
"""

from __future__ import annotations

import bisect
import copy
import datetime
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_INCLUDE_DEPTH", "ConfigSyntaxError", "parse", "parse_file"]

# Maximum number of nested include directives, counted from the file given to parse().
MAX_INCLUDE_DEPTH = 10
# Maximum nesting of maps and arrays in one text, which keeps the recursion far below Python's limit.
_MAX_NESTING_DEPTH = 100

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_BOOLEANS = {
    "true": True,
    "yes": True,
    "on": True,
    "false": False,
    "no": False,
    "off": False,
}


def _build_size_multipliers() -> dict[str, int]:
    """Map each size suffix (lower case) to its multiplier: `k` is 1000, `kb`, `ki` and `kib` are 1024."""
    multipliers: dict[str, int] = {}
    for power, letter in enumerate("kmgtpe", start=1):
        multipliers[letter] = 1000**power
        for binary_suffix in ("b", "i", "ib"):
            multipliers[letter + binary_suffix] = 1024**power
    return multipliers


_SIZE_MULTIPLIERS = _build_size_multipliers()

_INTEGER_PATTERN = re.compile(r"-?[0-9]+")
_SIZED_INTEGER_PATTERN = re.compile(r"(-?[0-9]+)([kmgtpe](?:i?b|i)?)", re.IGNORECASE)
_FLOAT_PATTERN = re.compile(r"-?[0-9]+\.[0-9]+")
_DATETIME_PATTERN = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")

# Character sets are frozensets because `"" in "abc"` is true for strings, and peek() returns "" at the end.
_BLANKS = frozenset(" \t")
_LINE_BREAKS = frozenset("\r\n")
# Characters that end an unquoted value. Everything else, including ':', '=', '#' and '//', belongs to it.
_UNQUOTED_VALUE_END = frozenset(" \t\r\n;,]}'")
# Characters that end an unquoted key, besides the end of the text.
_UNQUOTED_KEY_END = frozenset(" \t\r\n=:{}")
# Characters that cannot start a key.
_INVALID_KEY_START = frozenset(",;=:[]{")
_ESCAPES_HELP = '\\xHH, \\t, \\n, \\r, \\", \\\\'
_SIMPLE_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", '"': '"', "\\": "\\"}
# An include path may not start with these, as in nats-server.
_INVALID_INCLUDE_START = frozenset("0123456789-[{(\\")


class ConfigSyntaxError(ValueError):
    """A configuration file that cannot be parsed.

    `line` and `column` are 1-based and count characters, so a tab is one column.
    `message` is the description without the location prefix.
    """

    def __init__(self, message: str, filename: str, line: int, column: int) -> None:
        super().__init__(f"{filename}:{line}:{column}: {message}")
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column


class _VariableCycleError(ConfigSyntaxError):
    """An environment variable whose value refers back to itself, directly or through other variables."""


def parse(text: str, filename: str = "<string>", environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse configuration text into a dict of str, int, float, bool, datetime, list and dict values.

    `filename` appears in error messages, and include paths resolve relative to its directory
    (the current directory for "<string>"). Variable references that match no earlier key are
    looked up in `environ`, which defaults to os.environ. Raises ConfigSyntaxError.
    """
    if environ is None:
        environ = os.environ
    if filename == "<string>":
        base_directory = ""
        include_chain: tuple[str, ...] = ()
    else:
        base_directory = os.path.dirname(filename)
        include_chain = (os.path.realpath(filename),)
    parser = _Parser(
        text,
        filename,
        environ,
        base_directory=base_directory,
        include_chain=include_chain,
    )
    return parser.parse_document()


def parse_file(path: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read and parse the UTF-8 configuration file at `path`.

    An unreadable file raises the OSError from open() unchanged. Syntax errors, and include
    files that cannot be read, raise ConfigSyntaxError.
    """
    with open(path, "rb") as config_file:
        data = config_file.read()
    text = _decode_config_bytes(data, path)
    return parse(text, path, environ)


def _decode_config_bytes(data: bytes, filename: str) -> str:
    """Decode file contents as UTF-8, dropping a leading byte order mark, or raise ConfigSyntaxError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"invalid UTF-8 byte 0x{data[exc.start]:02x} (the column counts bytes), so save the file as UTF-8"
        raise ConfigSyntaxError(message, filename, line, column) from None


def _describe_character(character: str) -> str:
    """Return a quoted, printable form of one character for error messages, or 'end of file' for ''."""
    if character == "":
        return "end of file"
    if character in ("\n", "\r"):
        return "end of line"
    if character.isprintable():
        return f"'{character}'"
    return repr(character)


class _Scanner:
    """A cursor over configuration text that reads comments, keys, strings and unquoted tokens.

    The parser decides which read to do next, because the same character means different
    things in different places: '#' starts a comment before a key but not inside a value.
    """

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.index = 0
        self._line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def peek(self, offset: int = 0) -> str:
        """Return the character `offset` places ahead of the cursor, or '' past the end."""
        position = self.index + offset
        if position < len(self.text):
            return self.text[position]
        return ""

    def at_end(self) -> bool:
        return self.index >= len(self.text)

    def locate(self, index: int) -> tuple[int, int]:
        """Return the 1-based line and column of a character index."""
        line_index = bisect.bisect_right(self._line_starts, index) - 1
        return line_index + 1, index - self._line_starts[line_index] + 1

    def error(self, message: str, index: int | None = None) -> ConfigSyntaxError:
        """Build a ConfigSyntaxError at `index`, or at the cursor when `index` is None."""
        line, column = self.locate(self.index if index is None else index)
        return ConfigSyntaxError(message, self.filename, line, column)

    def skip_blanks(self) -> None:
        """Skip spaces and tabs, but not line breaks."""
        while self.peek() != "" and self.peek() in _BLANKS:
            self.index += 1

    def at_comment(self) -> bool:
        return self.peek() == "#" or (self.peek() == "/" and self.peek(1) == "/")

    def skip_comment(self) -> None:
        """Skip from the cursor to the end of the line, leaving the line break."""
        line_end = self.text.find("\n", self.index)
        self.index = len(self.text) if line_end == -1 else line_end

    def skip_space_and_comments(self) -> None:
        """Skip blanks, line breaks and whole comments, as allowed before a key or an array item."""
        while not self.at_end():
            character = self.peek()
            if character in _BLANKS or character in _LINE_BREAKS:
                self.index += 1
            elif self.at_comment():
                self.skip_comment()
            else:
                return

    def read_run(self, stop_characters: frozenset[str]) -> str:
        """Read characters up to one of `stop_characters` or the end, keeping a backslash with the next character."""
        start = self.index
        while not self.at_end() and self.peek() not in stop_characters:
            if self.peek() == "\\" and self.index + 1 < len(self.text):
                self.index += 1
            self.index += 1
        return self.text[start : self.index]

    def read_single_quoted(self) -> str:
        """Read a single-quoted string with the cursor on its opening quote. The content is raw."""
        start = self.index
        closing = self.text.find("'", start + 1)
        if closing == -1:
            raise self.error("single-quoted string is not closed before the end of the file", start)
        self.index = closing + 1
        return self.text[start + 1 : closing]

    def read_double_quoted_raw(self) -> str:
        """Read a double-quoted string with the cursor on its opening quote, leaving escapes undecoded."""
        start = self.index
        self.index += 1
        while not self.at_end():
            character = self.peek()
            if character == '"':
                self.index += 1
                return self.text[start + 1 : self.index - 1]
            if character == "\\":
                self.index += 1
            self.index += 1
        raise self.error("double-quoted string is not closed before the end of the file", start)

    def read_block(self) -> str:
        """Read a block string with the cursor on its '('.

        The block ends at the first line that contains only ')'. The value is everything
        between the '(' and that ')', including the line break after '(' and the one before ')'.
        """
        start = self.index
        search_from = start + 1
        while True:
            closing = self.text.find("\n)", search_from)
            if closing == -1:
                raise self.error("block string is not closed by a line that contains only ')'", start)
            after_closing = closing + 2
            # NOTE: a ')' line ending in '\r\n' also closes the block, but nats-server 2.15 rejects it.
            if after_closing == len(self.text) or self.text[after_closing] in _LINE_BREAKS:
                self.index = after_closing
                return self.text[start + 1 : closing + 1]
            search_from = closing + 1


class _Parser:
    """Recursive-descent parser for one configuration text: the main file, an include, or an environment value."""

    def __init__(
        self,
        text: str,
        filename: str,
        environ: Mapping[str, str],
        *,
        base_directory: str,
        include_chain: tuple[str, ...] = (),
        include_depth: int = 0,
        environment_chain: tuple[str, ...] = (),
    ) -> None:
        self.scanner = _Scanner(text, filename)
        self.filename = filename
        self.environ = environ
        # Directory that relative include paths start from; "" is the current directory.
        self.base_directory = base_directory
        # Real paths of the files being parsed, outermost first, to detect include loops.
        self.include_chain = include_chain
        # Number of include directives between the text given to parse() and this text.
        self.include_depth = include_depth
        # Environment variables being resolved, outermost first, to detect reference cycles.
        self.environment_chain = environment_chain
        # The maps being built, outermost first. Variable references search them innermost first.
        self.scopes: list[dict[str, Any]] = []
        # Number of maps and arrays open at the cursor.
        self.nesting_depth = 0

    # Document structure.

    def parse_document(self) -> dict[str, Any]:
        """Parse a whole file: an implicit top-level map, optionally wrapped in braces."""
        scanner = self.scanner
        document: dict[str, Any] = {}
        self.scopes.append(document)
        scanner.skip_space_and_comments()
        if scanner.peek() == "{":
            opening = scanner.index
            scanner.index += 1
            self.parse_entries(document, opening_index=opening)
            scanner.skip_space_and_comments()
            if not scanner.at_end():
                found = _describe_character(scanner.peek())
                raise scanner.error(f"unexpected {found} after the '}}' that closes the top-level map")
        else:
            self.parse_entries(document, opening_index=None)
        self.scopes.pop()
        return document

    def parse_entries(self, target: dict[str, Any], opening_index: int | None) -> None:
        """Parse key/value entries into `target` until the '}' that matches `opening_index`, or the end of the text."""
        scanner = self.scanner
        while True:
            scanner.skip_space_and_comments()
            character = scanner.peek()
            if character == "":
                if opening_index is not None:
                    raise scanner.error(
                        "map is not closed with '}' before the end of the file",
                        opening_index,
                    )
                return
            if character == "}":
                if opening_index is None:
                    raise scanner.error("unexpected '}' with no open map")
                scanner.index += 1
                return
            key = self.parse_entry(target)
            self.finish_map_value(key)

    def parse_entry(self, target: dict[str, Any]) -> str:
        """Parse one `key value` entry or include directive into `target`, and return the key (or 'include')."""
        scanner = self.scanner
        key_index = scanner.index
        key, quoted = self.parse_key()

        if not quoted and key.lower() == "include" and scanner.peek() in ("\t", " "):
            self.parse_include(target, key_index)
            return key

        scanner.skip_blanks()
        if scanner.peek() in ("=", ":"):
            scanner.index += 1
            scanner.skip_blanks()
        else:
            # Without a separator the value may even start on a later line, as in a map's
            # opening brace on its own line.
            while scanner.peek() in _BLANKS or scanner.peek() in _LINE_BREAKS:
                scanner.index += 1
            if scanner.at_end():
                raise scanner.error(f"key '{key}' has no value", key_index)

        target[key] = self.parse_value(f"key '{key}'")
        return key

    def parse_key(self) -> tuple[str, bool]:
        """Read a key and return it with whether it was quoted. Quoted keys take no escapes."""
        scanner = self.scanner
        character = scanner.peek()
        if character == '"':
            start = scanner.index
            closing = scanner.text.find('"', start + 1)
            if closing == -1:
                raise scanner.error("double-quoted key is not closed before the end of the file", start)
            scanner.index = closing + 1
            return scanner.text[start + 1 : closing], True
        if character == "'":
            return scanner.read_single_quoted(), True
        if character in _INVALID_KEY_START:
            raise scanner.error(f"expected a key but found '{character}'")
        start = scanner.index
        while not scanner.at_end() and scanner.peek() not in _UNQUOTED_KEY_END:
            scanner.index += 1
        return scanner.text[start : scanner.index], False

    def finish_map_value(self, key: str) -> None:
        """Consume what may follow a value in a map: blanks, then a line break, ';', ',', a comment or '}'."""
        scanner = self.scanner
        scanner.skip_blanks()
        character = scanner.peek()
        if character in ("", "}"):
            return
        if character in _LINE_BREAKS or character in (";", ","):
            scanner.index += 1
            return
        if scanner.at_comment():
            scanner.skip_comment()
            return
        raise scanner.error(
            f"expected a line break, ';', ',' or '}}' after the value of '{key}' "
            f"but found {_describe_character(character)}"
        )

    # Values.

    def parse_value(self, subject: str) -> Any:
        """Parse the value that starts at the cursor.

        `subject` names its place in error messages, as in "key 'port'".
        """
        scanner = self.scanner
        character = scanner.peek()
        if character == "{":
            return self.parse_map()
        if character == "[":
            return self.parse_array()
        if character == '"':
            start = scanner.index
            raw = scanner.read_double_quoted_raw()
            return self.decode_escapes(raw, start + 1, "a double-quoted string")
        if character == "'":
            return scanner.read_single_quoted()
        if character == "(":
            return scanner.read_block()
        if character in ("", "\r", "\n", ",", ";", "]", "}"):
            raise scanner.error(f"missing value for {subject} before the {_describe_character(character)}")

        start = scanner.index
        token = scanner.read_run(_UNQUOTED_VALUE_END)
        if character == "-" or "0" <= character <= "9":
            return self.convert_numeric_token(token, start)
        if character == ".":
            raise scanner.error(
                f"invalid value '{token}': write a float with a leading digit (0.5) "
                "and quote a string that starts with '.'",
                start,
            )
        return self.convert_unquoted_token(token, start)

    def convert_numeric_token(self, token: str, start: int) -> Any:
        """Convert an unquoted token that starts with a digit or '-' to an int, float, datetime or string."""
        scanner = self.scanner
        if _INTEGER_PATTERN.fullmatch(token):
            return self.check_int64(int(token), token, start)

        sized = _SIZED_INTEGER_PATTERN.fullmatch(token)
        if sized:
            multiplier = _SIZE_MULTIPLIERS[sized.group(2).lower()]
            return self.check_int64(int(sized.group(1)) * multiplier, token, start)

        if _FLOAT_PATTERN.fullmatch(token):
            return float(token)

        date_match = _DATETIME_PATTERN.fullmatch(token)
        if date_match:
            year, month, day, hour, minute, second = (int(group) for group in date_match.groups())
            try:
                return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
            except ValueError as exc:
                raise scanner.error(f"invalid datetime '{token}': {exc}", start) from None

        if token.startswith("-"):
            raise scanner.error(
                f"invalid number '{token}' starts with '-', so quote it if it is meant as a string",
                start,
            )
        # NOTE: nats-server 2.15 rejects some of these, such as 1.5s and 10.0.0.0/8, instead of returning a string.
        return self.decode_escapes(token, start, "an unquoted string")

    def check_int64(self, number: int, token: str, start: int) -> int:
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise self.scanner.error(f"integer '{token}' is outside the 64-bit signed integer range", start)
        return number

    def convert_unquoted_token(self, token: str, start: int) -> Any:
        """Convert an unquoted token that does not start with a digit to a bool, a variable's value or a string."""
        boolean = _BOOLEANS.get(token.lower())
        if boolean is not None:
            return boolean
        # A bcrypt hash such as $2a$11$... is a password, not a variable reference.
        if token.startswith("$") and not token.startswith("$2a$"):
            return self.resolve_variable(token[1:], start)
        return self.decode_escapes(token, start, "an unquoted string")

    def decode_escapes(self, raw: str, start: int, kind: str) -> str:
        """Decode backslash escapes in `raw`, which begins at text index `start`. `kind` names the string in errors.

        A \\xHH escape is one byte, so consecutive escapes can spell a UTF-8 sequence such as \\xc3\\xa9.
        """
        if "\\" not in raw:
            return raw
        scanner = self.scanner
        decoded = bytearray()
        position = 0
        while position < len(raw):
            character = raw[position]
            if character != "\\":
                decoded += character.encode("utf-8")
                position += 1
                continue
            escape = raw[position + 1 : position + 2]
            if escape in _SIMPLE_ESCAPES:
                decoded += _SIMPLE_ESCAPES[escape].encode("utf-8")
                position += 2
            elif escape == "x":
                digits = raw[position + 2 : position + 4]
                if len(digits) != 2 or any(digit not in "0123456789abcdefABCDEF" for digit in digits):
                    raise scanner.error(
                        f"escape '\\x' must be followed by two hexadecimal digits, not '{digits}'",
                        start + position,
                    )
                decoded.append(int(digits, 16))
                position += 4
            else:
                found = _describe_character(escape)
                raise scanner.error(
                    f"invalid escape character {found} in {kind}; allowed: {_ESCAPES_HELP}",
                    start + position,
                )
        try:
            return decoded.decode("utf-8")
        except UnicodeDecodeError:
            # NOTE: nats-server accepts any bytes here, but a Python str cannot hold invalid UTF-8.
            raise scanner.error(f"the \\xHH escapes in {kind} do not form valid UTF-8", start) from None

    def parse_map(self) -> dict[str, Any]:
        """Parse a braced map with the cursor on its '{'. Its keys are visible as variables inside it."""
        scanner = self.scanner
        opening = scanner.index
        self.enter_nesting()
        scanner.index += 1
        result: dict[str, Any] = {}
        self.scopes.append(result)
        self.parse_entries(result, opening_index=opening)
        self.scopes.pop()
        self.nesting_depth -= 1
        return result

    def parse_array(self) -> list[Any]:
        """Parse an array with the cursor on its '['.

        Items are separated by ',' or line breaks, and a trailing ',' is allowed.
        """
        scanner = self.scanner
        opening = scanner.index
        self.enter_nesting()
        scanner.index += 1
        items: list[Any] = []
        while True:
            scanner.skip_space_and_comments()
            character = scanner.peek()
            if character == "":
                raise scanner.error("array is not closed with ']' before the end of the file", opening)
            if character == "]":
                scanner.index += 1
                self.nesting_depth -= 1
                return items
            if character == ",":
                raise scanner.error("unexpected ',' in an array where a value or ']' belongs")
            items.append(self.parse_value("an array item"))

            scanner.skip_blanks()
            character = scanner.peek()
            if character in (",", "\r", "\n"):
                scanner.index += 1
            elif scanner.at_comment():
                scanner.skip_comment()
            elif character == "":
                raise scanner.error("array is not closed with ']' before the end of the file", opening)
            elif character != "]":
                found = _describe_character(character)
                raise scanner.error(f"expected ',', a line break or ']' after an array item but found {found}")

    def enter_nesting(self) -> None:
        """Count a map or array that opens at the cursor, raising ConfigSyntaxError past the nesting limit."""
        if self.nesting_depth >= _MAX_NESTING_DEPTH:
            raise self.scanner.error(f"maps and arrays are nested more than {_MAX_NESTING_DEPTH} levels deep")
        self.nesting_depth += 1

    # Variables.

    def resolve_variable(self, name: str, index: int) -> Any:
        """Return the value of `$name`: an earlier key of this or an enclosing map, else an environment variable."""
        scanner = self.scanner
        if name == "":
            raise scanner.error("variable reference '$' has no name", index)

        for scope in reversed(self.scopes):
            if name in scope:
                # Copy so that two keys never share one mutable list or dict.
                return copy.deepcopy(scope[name])

        if name not in self.environ:
            raise scanner.error(
                f"variable reference ${name} is not defined (no earlier key and no environment variable)",
                index,
            )
        if name in self.environment_chain:
            cycle = " -> ".join(self.environment_chain + (name,))
            line, column = scanner.locate(index)
            message = f"variable reference ${name} is part of a cycle of environment variables: {cycle}"
            raise _VariableCycleError(message, self.filename, line, column)
        return self.parse_environment_value(name, index)

    def parse_environment_value(self, name: str, index: int) -> Any:
        """Parse the environment variable `name` as a config value, so that '77' becomes an int. Blank is ''."""
        value_text = self.environ[name]
        parser = _Parser(
            value_text,
            f"${name}",
            self.environ,
            base_directory=self.base_directory,
            include_chain=self.include_chain,
            include_depth=self.include_depth,
            environment_chain=self.environment_chain + (name,),
        )
        scanner = parser.scanner
        try:
            scanner.skip_blanks()
            if scanner.at_end():
                return ""
            value = parser.parse_value(f"environment variable {name}")
            scanner.skip_space_and_comments()
            if not scanner.at_end():
                found = _describe_character(scanner.peek())
                raise scanner.error(f"unexpected {found} after the value")
        except _VariableCycleError as exc:
            line, column = self.scanner.locate(index)
            raise _VariableCycleError(exc.message, self.filename, line, column) from None
        except ConfigSyntaxError as exc:
            where = f"column {exc.column}" if exc.line == 1 else f"line {exc.line}, column {exc.column}"
            message = f"environment variable {name} cannot be parsed as a config value at {where}: {exc.message}"
            raise self.scanner.error(message, index) from None
        return value

    # Includes.

    def parse_include(self, target: dict[str, Any], keyword_index: int) -> None:
        """Parse an include directive after its keyword and merge the included file's keys into `target`."""
        scanner = self.scanner
        scanner.skip_blanks()
        character = scanner.peek()
        if character == '"':
            closing = scanner.text.find('"', scanner.index + 1)
            if closing == -1:
                raise scanner.error("double-quoted include path is not closed before the end of the file")
            path = scanner.text[scanner.index + 1 : closing]
            scanner.index = closing + 1
        elif character == "'":
            path = scanner.read_single_quoted()
        elif character == "" or character in _LINE_BREAKS:
            raise scanner.error("include directive has no file path", keyword_index)
        elif character in _INVALID_INCLUDE_START:
            raise scanner.error(f"include path cannot start with '{character}' unless it is quoted")
        else:
            path = scanner.read_run(_UNQUOTED_VALUE_END)

        # NOTE: an absolute include path is used as is, but nats-server 2.15 joins it to the including file's directory.
        resolved = os.path.join(self.base_directory, path)
        included = self.read_include(path, resolved, keyword_index)
        for key, value in included.items():
            target[key] = value

    def read_include(self, path: str, resolved: str, keyword_index: int) -> dict[str, Any]:
        """Read and parse the include file at `resolved`, rejecting loops and excessive nesting."""
        scanner = self.scanner
        real_path = os.path.realpath(resolved)
        if real_path in self.include_chain:
            chain = " -> ".join(self.include_chain + (real_path,))
            raise scanner.error(f"include file '{path}' includes itself through {chain}", keyword_index)
        if self.include_depth >= MAX_INCLUDE_DEPTH:
            raise scanner.error(
                f"include file '{path}' is nested more than {MAX_INCLUDE_DEPTH} includes deep",
                keyword_index,
            )
        try:
            with open(resolved, "rb") as include_file:
                data = include_file.read()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise scanner.error(
                f"cannot read include file '{path}' at {resolved}: {reason}",
                keyword_index,
            ) from None

        text = _decode_config_bytes(data, resolved)
        # As in nats-server, variable references in an included file cannot refer to the including file's keys.
        parser = _Parser(
            text,
            resolved,
            self.environ,
            base_directory=os.path.dirname(resolved),
            include_chain=self.include_chain + (real_path,),
            include_depth=self.include_depth + 1,
            environment_chain=self.environment_chain,
        )
        return parser.parse_document()
