"""`afd chat`: an interactive conversation on the monolithic engine, streamed as it decodes."""

from __future__ import annotations

import sys

from afd_compile.cli.options import make_engine, sampling_params
from afd_compile.errors import AfdError


CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this"


def cmd_chat(args) -> None:
    from afd_compile.model.loader import single_turn

    params = sampling_params(args)
    one_turn = single_turn(args.model) if args.single_turn is None else args.single_turn
    engine = make_engine(args)
    messages = []
    hold = max((len(s) for s in params.stop), default=1) - 1
    print(f"afd chat{' (single-turn: each message alone)' if one_turn else ''}: {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line.startswith("/"):  # a command, never sent to the model
            if line == "/exit":
                break
            if line == "/reset":
                messages.clear()
                print("(conversation cleared)", file=sys.stderr)
            else:
                print(CHAT_HELP if line == "/help" else f"unknown command {line}: {CHAT_HELP}", file=sys.stderr)
            continue
        if not line:
            continue
        if one_turn:
            messages.clear()
        messages.append({"role": "user", "content": line})
        try:
            seq = engine.add_request(engine.encode_chat(messages), params)
        except AfdError as e:  # e.g. the conversation outgrew the context: report and keep chatting
            print(f"error: {e}", file=sys.stderr)
            messages.clear()
            continue
        shown = ""
        while not seq.finished:
            engine.step()
            # Hold back the tail a stop string could still start in (as vLLM's detokenizer does):
            # a match would cut it from the text after it was printed.
            visible = seq.output_text if seq.finished else seq.output_text[: len(seq.output_text) - hold]
            print(visible[len(shown):], end="", flush=True)
            shown = visible
        print()
        messages.append({"role": "assistant", "content": seq.output_text.strip()})
