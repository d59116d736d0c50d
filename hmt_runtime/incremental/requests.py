"""The one request loop, under ``generate`` (``hmt_runtime.incremental.generation``) and ``hmt serve``
(``hmt_runtime.serving.loop``): sequences take scheduler rows, their inputs are read a piece at a time (the
inputs being read take turns), the generating rows choose their tokens (``sampling.choose``) and decode together,
and each chosen token is recorded with what ends a sequence (an end-of-sequence id, the length, a stop string)
and the text it adds.

``generate`` drives it from the caller's thread; the server from its engine thread, adding queues, cancellation
and metrics around the same calls:

    batch = RequestBatch(scheduler)
    batch.admit(row, sequence)            # a free row (batch.free_rows()) starts reading sequence.ids
    batch.read_one()                      # one piece of one input; a finished prompt's row generates
    for sequence, text, reason in batch.advance():   # one token per generating row
        ...
    batch.decode()                        # one batched decode step of the rows still generating
"""
from __future__ import annotations

from typing import Callable

import torch

from .sampling import Sampling, choose
from .scheduler import Ingestion, Scheduler

OnError = Callable[["Sequence", str, BaseException], None]


class TextPieces:
    """Incremental detokenisation: the new text of a growing token list, held back while it ends in a partial
    character, so that the pieces concatenate to the decode of all tokens."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sent = tokenizer, ""

    def update(self, tokens: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or not text.startswith(self.sent)):
            return ""
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return piece


class Sequence:
    """One input and what it produces.

    ids (L,) int64; max_new: tokens to generate (0: the input is only read); eos: ids that end it (the id is
    part of the output); sampling / warpers / generator: how its tokens are chosen (a generator of its own, or
    None for torch's global one); state: a batch-1 MemoryState to continue (not modified); tokenizer: text
    pieces are produced (``text``) and ``stop`` strings end it (the stop string is not sent); keep_state: once
    finished, ``final_state`` holds its state after the input and every token but a final end-of-sequence id;
    prompt: the input ends a prompt (False: a document read into a state); on_progress(n): ids read."""

    def __init__(self, ids: torch.Tensor, max_new: int = 0, eos=frozenset(), sampling: Sampling = Sampling(),
                 warpers=None, generator: torch.Generator | None = None, state=None, tokenizer=None,
                 stop: list[str] | tuple = (), keep_state: bool = False, prompt: bool = True, on_progress=None,
                 owner=None, index: int = 0):
        self.ids, self.max_new, self.eos = ids, max_new, eos
        self.sampling, self.generator, self.state = sampling, generator, state
        self.warpers = sampling.warpers() if warpers is None else warpers
        self.stop, self.keep_state, self.prompt, self.on_progress = list(stop), keep_state, prompt, on_progress
        self.owner, self.index = owner, index  # the caller's request and this sequence's place in it
        self.tokens: list[int] = []
        self.pieces = TextPieces(tokenizer) if tokenizer is not None else None
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of ``text`` handed out (the rest may start a stop string)
        self.finish_reason: str | None = None
        self.final_state = None

    def record(self, token: int) -> tuple[str, str | None]:
        """Add a chosen token -> (text to hand out now, finish reason: "stop", "length" or None)."""
        self.tokens.append(token)
        reason = "stop" if token in self.eos else ("length" if len(self.tokens) >= self.max_new else None)
        text = ""
        if self.pieces is not None:
            text, stopped = self.advance(self.pieces.update(self.tokens, final=reason is not None),
                                         final=reason is not None)
            reason = "stop" if stopped else reason
        self.finish_reason = reason
        return text, reason

    def advance(self, piece: str, final: bool) -> tuple[str, bool]:
        """Add newly decoded text -> (text to hand out now, a stop string was reached)."""
        self.text += piece
        stops = self.stop
        if stops:
            hits = [p for p in (self.text.find(s, self.sent) for s in stops) if p >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = self.text[self.sent : cut], cut
                return out, True
        end = len(self.text)
        if stops and not final:  # hold back a tail that may be the start of a stop string
            for keep in range(min(max(map(len, stops)) - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - keep :]) for s in stops):
                    end -= keep
                    break
        out, self.sent = self.text[self.sent : end], end
        return out, False


class RequestBatch:
    """The sequences in a scheduler's rows: ``reading`` (row -> [sequence, Ingestion or None while reserved]),
    ``generating`` (row -> sequence) and ``closing`` (row -> a finished sequence whose last token is read at the
    next ``decode`` so that its ``final_state`` includes it).  ``chunk_tokens``: ids read per piece at most
    (default: up to a segment's end)."""

    def __init__(self, scheduler: Scheduler, chunk_tokens: int | None = None):
        self.sched, self.chunk_tokens = scheduler, chunk_tokens
        self.reading: dict[int, list] = {}
        self.generating: dict[int, Sequence] = {}
        self.closing: dict[int, Sequence] = {}
        self._turn = -1  # the row whose input was read last

    # ------------------------------------------------------------------------------------------ rows
    def free_rows(self) -> list[int]:
        taken = self.reading.keys() | self.generating.keys() | self.closing.keys()
        return [row for row in self.sched.free_rows() if row not in taken]

    def busy(self) -> bool:
        return bool(self.reading or self.generating or self.closing)

    def reserve(self, row: int, sequence: Sequence) -> None:
        """Hold a free row for ``sequence`` (``start`` begins reading it)."""
        self.reading[row] = [sequence, None]

    def start(self, row: int) -> Ingestion:
        """Begin reading the input of the sequence reserved in ``row`` (its state is loaded here).  On an error
        the row is freed and the error raised."""
        sequence = self.reading[row][0]
        try:
            job = self.sched.ingestion(sequence.ids.to(self.sched.model.device), state=sequence.state, row=row,
                                       on_progress=sequence.on_progress, chunk_tokens=self.chunk_tokens,
                                       prompt=sequence.prompt)
        except BaseException:
            self.reading.pop(row, None)
            raise
        self.reading[row][1] = job
        return job

    def admit(self, row: int, sequence: Sequence) -> None:
        self.reserve(row, sequence)
        self.start(row)

    def read_one(self, on_error: OnError | None = None) -> tuple[Sequence, int, bool] | None:
        """One piece of the next input being read (rows take turns) -> (sequence, ids read, whether its input is
        now read), or None when nothing is being read (or its reading failed).  A read prompt generates from the
        next ``advance``; a sequence with nothing to generate leaves its row (its ``final_state`` taken first if
        it keeps one).  On an error the row is freed and the error handed to ``on_error(sequence, "reading the
        input", error)`` (as in ``advance``), or raised without it."""
        rows = sorted(row for row, (_, job) in self.reading.items() if job is not None)
        if not rows:
            return None
        row = next((r for r in rows if r > self._turn), rows[0])
        self._turn = row
        sequence, job = self.reading[row]
        before = job.read
        try:
            done = job.step()
        except BaseException as err:
            self.reading.pop(row, None)  # the Ingestion freed the row
            if on_error is None or not isinstance(err, Exception):
                raise
            self._fail(sequence, "reading the input", err, on_error)
            return None
        if not done:
            return sequence, job.read - before, False
        del self.reading[row]
        if sequence.max_new > 0:
            self.generating[row] = sequence
            return sequence, job.read - before, True
        try:
            if sequence.keep_state:
                sequence.final_state = self.sched.export(row)
        finally:
            self.sched.release(row)
        return sequence, job.read - before, True

    def drop(self, which: Callable[[Sequence], bool]) -> None:
        """Free the rows of every sequence for which ``which(sequence)`` is true (inputs being read are
        abandoned)."""
        for row, sequence in list(self.generating.items()) + list(self.closing.items()):
            if which(sequence):
                self.generating.pop(row, None)
                self.closing.pop(row, None)
                self.sched.release(row)
        for row, (sequence, job) in list(self.reading.items()):
            if which(sequence):
                self.reading.pop(row)
                if job is not None:
                    job.close()

    def clear(self) -> None:
        self.drop(lambda sequence: True)
        for row in self.sched.live_rows():
            self.sched.release(row)

    # ------------------------------------------------------------------------------------------ one step
    def _choose(self, on_error: OnError | None) -> list[int]:
        """The next token of every generating row into ``scheduler.tokens``: the argmax for greedy rows; rows
        sampling with torch's global generator and the same settings draw together, a row with a generator of
        its own draws alone.  Returns the tokens of rows [0, max row] (the one host read of a step)."""
        batch = max(self.generating) + 1
        logits = self.sched.logits[:batch]
        chosen = torch.argmax(logits, dim=-1)
        shared: dict[int, list[int]] = {}
        for row, sequence in sorted(self.generating.items()):
            if not sequence.sampling.do_sample:
                continue
            if sequence.generator is None:
                shared.setdefault(id(sequence.sampling), []).append(row)
                continue
            try:
                chosen[row] = choose(logits[row : row + 1], sequence.sampling, sequence.generator, sequence.warpers)[0]
            except Exception as err:
                self._fail(sequence, "sampling", err, on_error)
        for rows in shared.values():
            sequence = self.generating[rows[0]]
            index = torch.tensor(rows, device=logits.device)
            try:
                chosen[index] = choose(logits[index], sequence.sampling, None, sequence.warpers)
            except Exception as err:
                for row in rows:
                    if row in self.generating:
                        self._fail(self.generating[row], "sampling", err, on_error)
        self.sched.tokens[:batch] = chosen
        return chosen.tolist()

    def advance(self, on_error: OnError | None = None) -> list[tuple[Sequence, str, str | None]]:
        """Choose and record one token of every generating row -> (sequence, text to hand out, finish reason)
        per row, in row order.  A finished sequence leaves its row (or, keeping its state after a last token
        that is not an end-of-sequence id, stays for one more ``decode`` to read it).  ``on_error(sequence,
        what, error)``: a failure of one sequence (sampling, text) frees its row and is handed there, the others
        go on; without it the error is raised."""
        if not self.generating:
            return []
        chosen = self._choose(on_error)
        out = []
        for row, sequence in sorted(self.generating.items()):
            if self.generating.get(row) is not sequence:  # freed by a failure of an earlier row
                continue
            try:
                text, reason = sequence.record(chosen[row])
            except Exception as err:
                self._fail(sequence, "producing the text", err, on_error)
                continue
            out.append((sequence, text, reason))
            if reason is None:
                continue
            del self.generating[row]
            if sequence.keep_state and sequence.tokens[-1] not in sequence.eos:
                self.closing[row] = sequence
                continue
            if sequence.keep_state:
                sequence.final_state = self.sched.export(row)
            self.sched.release(row)
        return out

    def decode(self, on_error: OnError | None = None) -> None:
        """One batched decode step of the rows still generating (and of the closing rows, whose states are then
        taken and their rows freed).  ``on_error`` as in ``advance``, for one row's own work; a failure of the
        batched step itself is raised."""
        if not (self.generating or self.closing):
            return

        def row_failed(row: int, err: BaseException) -> None:  # the scheduler freed the row
            sequence = self.generating.pop(row, None) or self.closing.pop(row, None)
            if sequence is not None:
                self._fail(sequence, "decoding", err, on_error)

        if on_error is None:
            self.sched.step()
        else:
            self.sched.step(on_error=row_failed)
        for row, sequence in self.closing.items():
            sequence.final_state = self.sched.export(row)
            self.sched.release(row)
        self.closing.clear()

    def _fail(self, sequence: Sequence, what: str, err: BaseException, on_error: OnError | None) -> None:
        if on_error is None:
            raise err
        self.drop(lambda s: s is sequence)
        on_error(sequence, what, err)
