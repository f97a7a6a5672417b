"""A file holding one JSON array of records (Alpaca's data, json.dump's output), read as a stream.

The file is decoded in chunks of a megabyte and each element is parsed with
`json.JSONDecoder.raw_decode` as soon as it is complete, so memory holds one chunk plus the
element being read, whatever the file's size; each element is reported with the line where it
starts, so errors still name file, line and field. A JSON array is one document: after a syntax
error there is no next line to go on from, so the reader stops there with `ArrayReadError`
(the records before it were read).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import BinaryIO, Iterator

CHUNK = 1 << 20
_SPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()
# An error this far before the end of what has been read is not caused by the read stopping there
# (literals and numbers are shorter); an unterminated string may be, however long.
_MARGIN = 64


class ArrayReadError(Exception):
    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


class _Text:
    """Decoded text read ahead from a binary file, with the line and column of the read position."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.decoder = fh, codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.line_start = 1, 0  # line_start: offset of the current line's start, relative to buf

    def more(self, size: int = 0) -> None:
        data = self.fh.read(size or CHUNK)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise ArrayReadError(self.line_of(len(self.buf)), "the file is not valid UTF-8 from this line on") from None
        self.eof = not data
        self.buf, self.line_start, self.pos = self.buf[self.pos:] + text, self.line_start - self.pos, 0

    def advance(self, n: int) -> None:
        end = self.pos + n
        newlines = self.buf.count("\n", self.pos, end)
        if newlines:
            self.line += newlines
            self.line_start = self.buf.rfind("\n", self.pos, end) + 1
        self.pos = end

    def line_of(self, index: int) -> int:
        return self.line + self.buf.count("\n", self.pos, index)

    def column_of(self, index: int) -> int:
        start = self.buf.rfind("\n", self.pos, index)
        return index - (start + 1 if start >= 0 else self.line_start) + 1

    def peek(self) -> str | None:
        """The next character that is not white space, or None at the end of the file."""
        while True:
            self.advance(_SPACE.match(self.buf, self.pos).end() - self.pos)
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self.more()

    def value(self) -> object:
        """The JSON value at the read position, reading on until it is complete."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number at the buffer's end may go on in the next chunk
                    self.advance(end - self.pos)
                    return value
            except json.JSONDecodeError as exc:
                if self.eof or (len(self.buf) - exc.pos >= _MARGIN and not exc.msg.startswith("Unterminated string")):
                    raise ArrayReadError(self.line_of(exc.pos),
                                         f"invalid JSON: {exc.msg} (column {self.column_of(exc.pos)}); "
                                         "the rest of the array was not read") from None
            except RecursionError:
                raise ArrayReadError(self.line, "invalid JSON: nested too deeply; the rest of the array was not read") from None
            except ValueError as exc:  # e.g. an integer past CPython's int-parsing limit
                raise ArrayReadError(self.line, f"invalid JSON: {exc}; the rest of the array was not read") from None
            self.more(max(CHUNK, len(self.buf) - self.pos))  # a large element: read ahead geometrically


def iter_json_array(fh: BinaryIO) -> Iterator[tuple[int, object]]:
    """(line where the element starts, element) for each element of the array the file holds."""
    text = _Text(fh)
    if text.peek() != "[":
        raise ArrayReadError(text.line, "expected a JSON array")
    text.advance(1)
    ch = text.peek()
    while ch != "]":  # at an element
        if ch is None:
            raise ArrayReadError(text.line, "the file ends inside the JSON array (no closing ']')")
        yield text.line, text.value()
        ch = text.peek()
        if ch == ",":
            text.advance(1)
            ch = text.peek()
            if ch == "]":
                raise ArrayReadError(text.line, "a comma before ']': JSON allows no trailing comma")
        elif ch not in ("]", None):
            raise ArrayReadError(text.line, f"invalid JSON: expected ',' or ']' after an element, found {ch!r}; "
                                            "the rest of the array was not read")
    text.advance(1)
    if text.peek() is not None:
        raise ArrayReadError(text.line, "more data after the JSON array's closing ']': a file holds one JSON array "
                                        "or JSON Lines, not both")
