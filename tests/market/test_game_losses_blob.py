"""The round-game losses blob: the encoding's known answers and refusals."""

from __future__ import annotations

import pytest

from server.market.game_losses import (
    GameLosses,
    GameLossesError,
    decode_game_losses,
    encode_game_losses,
)


# ------------------------------------------------------------------------ the encoding
def test_the_blob_is_rfc_8785_canonical_json_of_both_fields() -> None:
    game = GameLosses(coalitions_micro={2: 7, 10: -3, 1: 5}, prefix_losses_micro=[[9, 8]])
    data = encode_game_losses(game)
    # RFC 8785 section 3.2.3: keys sorted by UTF-16 code units, so "10" before "2"
    assert data == (b'{"coalitions_micro":{"1":5,"10":-3,"2":7},'
                    b'"prefix_losses_micro":[[9,8]]}')
    assert decode_game_losses(data) == game
    assert encode_game_losses(GameLosses()) == b'{"coalitions_micro":{},"prefix_losses_micro":[]}'


@pytest.mark.parametrize(("data", "match"), [
    (b"\xff", "undecodable"),
    (b"[]", "an object with keys"),
    (b'{"coalitions_micro":{}}', "an object with keys"),
    (b'{"coalitions_micro":{},"extra":1,"prefix_losses_micro":[]}', "an object with keys"),
    (b'{"coalitions_micro":{"1":1.5},"prefix_losses_micro":[]}', "integer loss"),
    (b'{"coalitions_micro":{"1":true},"prefix_losses_micro":[]}', "integer loss"),
    (b'{"coalitions_micro":{"1":NaN},"prefix_losses_micro":[]}', "got NaN"),
    (b'{"coalitions_micro":{"0":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":{"01":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":{"x":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":[],"prefix_losses_micro":[]}', "coalitions_micro as an object"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":{}}', "prefix_losses_micro as a list"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":[[1,"2"]]}', r"prefix_losses_micro\[0\]"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":[[9007199254740992]]}', "2\\*\\*53"),
    (b'{"prefix_losses_micro":[],"coalitions_micro":{}}', "canonical"),
    (b'{"coalitions_micro":{}, "prefix_losses_micro":[]}', "canonical"),
    (b'{"coalitions_micro":{"2":1,"1":1},"prefix_losses_micro":[]}', "canonical"),
    (b'{"coalitions_micro":{"1":1,"1":2},"prefix_losses_micro":[]}', "canonical"),
])
def test_anything_but_the_canonical_encoding_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(GameLossesError, match=match):
        decode_game_losses(data)
