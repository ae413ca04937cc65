"""SentencePiece model protos, read and patched at the wire level: `sentencepiece_model_pb2` needs a
protobuf runtime matching the one it was generated with, which the pinned protobuf is not.

The one patch needed: a copy of a model whose user-defined symbols (chat control tokens) are unused
pieces, so encoding message content never produces them (see `plain_text_model`).
"""

from __future__ import annotations

from typing import Iterator

import sentencepiece as spm

# Field numbers: ModelProto.pieces = 1, .normalizer_spec = 3; SentencePiece.piece = 1,
# .type = 3; NormalizerSpec.add_dummy_prefix = 3.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(data: bytes, at: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[at]
    value |= (byte & 0x7F) << shift
    at, shift = at + 1, shift + 7
    if byte < 0x80:
      return value, at


def _put_varint(value: int) -> bytes:
  out = bytearray()
  while True:
    out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
    value >>= 7
    if not value:
      return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
  """(field number, wire type, value) of a serialized message: ints for varints, raw bytes otherwise."""
  at = 0
  while at < len(data):
    key, at = _varint(data, at)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, at = _varint(data, at)
    elif wire == 2:
      size, at = _varint(data, at)
      value, at = data[at : at + size], at + size
    else:  # fixed64 (1) or fixed32 (5)
      size = 8 if wire == 1 else 4
      value, at = data[at : at + size], at + size
    yield number, wire, value


def _field(number: int, wire: int, value: bytes | int) -> bytes:
  key = _put_varint(number << 3 | wire)
  if wire == 0:
    return key + _put_varint(value)
  return key + (_put_varint(len(value)) if wire == 2 else b"") + value


def piece_types(model_proto: bytes) -> list[tuple[str, int]]:
  """(piece, type) for every id of a SentencePiece model."""
  pieces = []
  for number, _, value in _fields(model_proto):
    if number == 1:
      fields = {n: v for n, _, v in _fields(value)}
      pieces.append((fields.get(1, b"").decode("utf-8"), fields.get(3, NORMAL)))
  return pieces


def plain_text_model(model_proto: bytes, dummy_prefix: bool = True) -> spm.SentencePieceProcessor:
  """The model with its user-defined symbols made unused pieces, which encoding never produces, so
  their text is spelled with ordinary pieces (or bytes) and ids stay those of the original model.
  `dummy_prefix=False` also drops the leading `▁`, for text that continues a sentence."""
  out = bytearray()
  for number, wire, value in _fields(model_proto):
    if number == 1:
      piece = b"".join(_field(n, w, UNUSED if n == 3 and v == USER_DEFINED else v) for n, w, v in _fields(value))
      value = piece
    elif number == 3 and not dummy_prefix:
      value = b"".join(_field(n, w, v) for n, w, v in _fields(value) if n != 3) + _field(3, 0, 0)
    out += _field(number, wire, value)
  return spm.SentencePieceProcessor(model_proto=bytes(out))


