"""The steps of a tool loop that the server (async, streaming events) and the chat command (a plain
loop) share: find the built-in call that ended a completion, answer past the call limit, and build
the next round's prompt."""

from __future__ import annotations

from collections.abc import Sequence

from ..harmony import ToolCall, render_continuation
from ..tokenizer import CALL
from .base import ToolResult, Toolbox, answer


def ended_with_call(tokens: Sequence[int], closed_calls: Sequence[ToolCall], toolbox: Toolbox | None,
                    names: Sequence[str]) -> ToolCall | None:
    """The call to one of the declared built-in tools `names` that ended a completion (its last token
    is `<|call|>` and its last closed message addresses the tool), or None."""
    if toolbox is None or not tokens or tokens[-1] != CALL or not closed_calls:
        return None
    call = closed_calls[-1]
    return call if toolbox.route(call.recipient, names) else None


def limit_reached(call: ToolCall, max_calls: int) -> ToolResult:
    """The answer to a call past the request's limit (the model gets one chance to answer)."""
    return answer(call.recipient, f"The limit of {max_calls} tool calls for this response is reached: answer "
                                  f"with what you have.", call, failed=True)


def next_prompt(prompt: Sequence[int], completion: Sequence[int], result: ToolResult) -> tuple[list[int], int]:
    """(the next round's prompt, how many tokens the tool's answer added): the prompt, the completion
    through `<|call|>`, the tool messages and `<|start|>assistant`, as harmony renders the conversation."""
    more = render_continuation(result.messages)
    return [*prompt, *completion, *more], len(more)
