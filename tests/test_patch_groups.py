"""Which patched runs share a forward: the cost trade written out by hand on small cases."""

from circuits.patching.groups import Piece, plan


def tokens(offset):  # a batch of one 10-token prompt: a copy computes positions offset..9
    return 10 - offset


def groups(forwards):
    return [[(p.layer, p.offset) for p in forward] for forward in forwards]


def test_launch_bound_work_shares_forwards_as_far_as_memory_allows():
    pieces = [Piece(layer, offset, (i,)) for i, (layer, offset) in enumerate([(1, 0), (0, 3), (0, 0), (1, 5)])]
    assert groups(plan(pieces, 2, tokens, 10_000, 1.0, 0.0)) == [[(0, 0), (0, 3), (1, 0), (1, 5)]]
    # 20 tokens a forward: copies from offset 0 take 10 each
    assert groups(plan(pieces, 2, tokens, 20, 1.0, 0.0)) == [[(0, 0), (0, 3)], [(1, 0), (1, 5)]]


def test_arithmetic_bound_work_never_shares():
    pieces = [Piece(0, 0, (0,)), Piece(0, 3, (1,)), Piece(1, 0, (2,))]
    assert groups(plan(pieces, 2, tokens, 10_000, 0.0, 1.0)) == [[(0, 0)], [(0, 3)], [(1, 0)]]


def test_a_piece_joins_only_when_the_saved_launches_outweigh_the_added_arithmetic():
    pieces = [Piece(0, 0, (0,)), Piece(0, 8, (1,))]
    # apart: 2 layers x (1 + 10 x 0.2) + 2 x (1 + 2 x 0.2) = 8.8 s; together 2 x (1 + 20 x 0.2) = 10 s
    assert groups(plan(pieces, 2, tokens, 10_000, 1.0, 0.2)) == [[(0, 0)], [(0, 8)]]
    # at 0.05 s a token: apart 3.0 + 2.2 = 5.2 s, together 2 x (1 + 20 x 0.05) = 4 s
    assert groups(plan(pieces, 2, tokens, 10_000, 1.0, 0.05)) == [[(0, 0), (0, 8)]]
    # a later layer's piece joins an earlier layer's forward only for the launches of the layers it adds
    late = [Piece(0, 0, (0,)), Piece(3, 0, (1,))]  # 4 layers; joining runs the late copy through 3 more layers
    # apart: 4 x (1 + 10 x 0.2) + 1 x (1 + 10 x 0.2) = 15 s; together 4 x (1 + 20 x 0.2) = 20 s
    assert groups(plan(late, 4, tokens, 10_000, 1.0, 0.2)) == [[(0, 0)], [(3, 0)]]
    # at 0.01 s a token: apart 4.4 + 1.1 = 5.5 s, together 4 x 1.2 = 4.8 s
    assert groups(plan(late, 4, tokens, 10_000, 1.0, 0.01)) == [[(0, 0), (3, 0)]]
