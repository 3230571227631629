"""The transition table: every legal and every illegal move, and terminal states."""

from __future__ import annotations

import itertools

import pytest

from tokengate import TERMINAL_STATES, TRANSITIONS, TokenState
from tokengate.states import can_transition

LEGAL = {
    (TokenState.CREATED, TokenState.WAITING),
    (TokenState.CREATED, TokenState.ADMITTED),
    (TokenState.CREATED, TokenState.REJECTED),
    (TokenState.CREATED, TokenState.QUARANTINED),
    (TokenState.CREATED, TokenState.KILLED),
    (TokenState.WAITING, TokenState.ADMITTED),
    (TokenState.WAITING, TokenState.KILLED),
    (TokenState.WAITING, TokenState.TIMEOUT),
    (TokenState.WAITING, TokenState.REJECTED),
    (TokenState.WAITING, TokenState.QUARANTINED),
    (TokenState.ADMITTED, TokenState.EXECUTING),
    (TokenState.ADMITTED, TokenState.KILLED),
    (TokenState.ADMITTED, TokenState.TIMEOUT),
    (TokenState.EXECUTING, TokenState.COMPLETED),
    (TokenState.EXECUTING, TokenState.FAILED),
    (TokenState.EXECUTING, TokenState.TIMEOUT),
    (TokenState.EXECUTING, TokenState.KILLED),
    (TokenState.EXECUTING, TokenState.WAITING),
}


@pytest.mark.parametrize("old,new", list(itertools.product(TokenState, TokenState)))
def test_every_pair_matches_the_documented_table(old: TokenState, new: TokenState) -> None:
    # Given any pair of states, the table allows exactly the documented moves.
    assert can_transition(old, new) is ((old, new) in LEGAL)


def test_terminal_states_have_no_exits() -> None:
    assert TERMINAL_STATES == {
        TokenState.COMPLETED, TokenState.FAILED, TokenState.KILLED,
        TokenState.TIMEOUT, TokenState.REJECTED, TokenState.QUARANTINED,
    }
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
        assert state.is_terminal
    for state in set(TokenState) - TERMINAL_STATES:
        assert TRANSITIONS[state], f"{state} must lead somewhere"
        assert not state.is_terminal


def test_every_state_can_reach_a_terminal_state() -> None:
    for start in TokenState:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & TERMINAL_STATES or start in TERMINAL_STATES
