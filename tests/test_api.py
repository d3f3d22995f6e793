"""The public API (`earlyexit.api`) on real weights: generate, stream, classify, errors.

The EarlyExit objects wrap the session's smollm2-135m engine; the run's EARLYEXIT_HOME is
fresh (tests/conftest.py), so every shallow readout here is the logit lens and every probe,
stopper and database is built by these tests.
"""

from __future__ import annotations

import gc
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from earlyexit.api import EarlyExit, Generation
from earlyexit.decoding.shallow_deep import DecodeResult
from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.paths import home
from earlyexit.runtime.classification import collect_states
from earlyexit.runtime.decoders import BuiltDecoder
from earlyexit.runtime.kept import Kept
from earlyexit.runtime.stream import TextAssembler
from earlyexit.tasks import Example, get_task

PROMPT = "Name three colours."
TOKENS = 16
# Three clearly positive and three clearly negative reviews, then an ambiguous one: a
# classifier that ignores its input (one label for all) gets half of GOLD wrong. Every
# method below labels all six right with wide margins, measured on an AMD EPYC (`lscpu`'s
# model name; fp32, the run's fresh home): the smallest gap between the two label scores,
# at the layer each review exits, is 0.95 logits for the zero-shot label map (the first
# review), 2.1 for the model's own head on SST-2's template, 1.6 for the file task's
# AdaInfer probe, 2.2 for RAEE's and 3.5 for AdaInfer's on SST-2, where CPUs' fp32
# roundings differ by ~1e-5. "fine" is not checked against a gold label (RAEE's probe
# puts its two labels 0.05 apart), only against the readout, as every review is.
REVIEWS = [
    "a gripping, beautifully acted film",
    "flat, dull and far too long",
    "a warm, funny and moving triumph",
    "a tedious, boring mess",
    "a brilliant, joyous celebration of life",
    "painfully unfunny and badly acted",
    "fine",
]
GOLD = ["positive", "negative"] * 3  # REVIEWS[:6]


@pytest.fixture(scope="module")
def ee(smol: LayerEngine) -> EarlyExit:
    return EarlyExit.from_engine(smol)


@pytest.fixture(scope="module")
def full(ee: EarlyExit) -> Generation:
    return ee.generate(PROMPT, method="full", max_new_tokens=TOKENS)


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "earlyexit-stream" and t.is_alive()]


def _fake(ee: EarlyExit, delay: float = 0.0, fail: Exception | None = None) -> BuiltDecoder:
    """A built decoder that emits a fixed text's tokens (or fails), without the model."""
    ids = ee.tokenizer("one two three four", add_special_tokens=False)["input_ids"]

    def decoder(prompt: str, config) -> DecodeResult:  # noqa: ANN001
        result = DecodeResult([], [], 0.0, 0, num_layers=ee.num_layers)
        result.listener = config.on_token
        for token in ids:
            if fail is not None:
                raise fail
            time.sleep(delay)
            result.push(token, ee.num_layers)
        return result

    return BuiltDecoder(decoder, None, {}, lambda: None)


def test_lossless_generate_is_the_full_models_greedy_output(
    ee: EarlyExit, full: Generation
) -> None:
    out = ee.generate(PROMPT, method="lossless", max_new_tokens=TOKENS)
    assert out.tokens == full.tokens and out.text == full.text
    assert out.text == ee.tokenizer.decode(out.tokens, skip_special_tokens=True)
    assert len(out.tokens) == TOKENS and out.finish_reason == "length"
    report = out.report
    assert report.method == "lossless" and report.completion_tokens == TOKENS
    assert report.prompt_tokens > 5 and report.tokens_per_s > 0
    assert report.exit_layers == [30] * TOKENS and report.shallow_fraction == 0
    assert report.passes >= 1 and report.draft_accepted <= report.draft_proposed
    assert "measured pass costs" in report.artifacts["drafts"]
    assert full.report.avg_layers == 30 and full.report.passes == TOKENS - 1
    assert full.report.threshold is None and full.report.shallow_layer is None


def test_stream_yields_what_generate_returns(ee: EarlyExit) -> None:
    expected = ee.generate(PROMPT, method="lossless", max_new_tokens=TOKENS)
    chunks = list(ee.stream(PROMPT, method="lossless", max_new_tokens=TOKENS))
    final = chunks[-1].generation
    assert final is not None and all(c.generation is None for c in chunks[:-1])
    assert [t for c in chunks for t in c.tokens] == expected.tokens == final.tokens
    assert "".join(c.text for c in chunks) == expected.text == final.text
    assert [layer for c in chunks for layer in c.exit_layers] == final.report.exit_layers
    assert final.finish_reason == "length" and final.report.completion_tokens == TOKENS
    assert not _stream_threads()


def test_a_stream_computes_in_its_consumers_thread(
    ee: EarlyExit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's stream decodes in the thread that reads it (here the one that loaded the
    model), not in its worker: a second computing thread makes every decode ~3.5x slower
    (runtime/scheduler.py). Batch rows and a method that decodes alone (`static`) alike."""
    seen: set[int] = set()
    for name in ("run_layers", "run_rows", "prefill"):
        real = getattr(ee.engine, name)

        def recording(*args: object, _real: Callable = real, **kwargs: object) -> object:
            seen.add(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(ee.engine, name, recording)
    for method in ("full", "lossless", "static"):
        chunks = list(ee.stream(PROMPT, method=method, max_new_tokens=6))
        assert sum(len(c.tokens) for c in chunks) == 6
    assert seen == {threading.get_ident()}
    assert not _stream_threads()


def test_stop_strings_end_the_text_before_them(ee: EarlyExit, full: Generation) -> None:
    stop = " " + next(word for word in full.text.split()[2:] if len(word) >= 5)
    cut = full.text.index(stop)
    out = ee.generate(PROMPT, method="lossless", max_new_tokens=TOKENS, stop=[stop])
    assert out.text == full.text[:cut] and out.finish_reason == "stop"
    assert out.tokens == full.tokens[: len(out.tokens)] and len(out.tokens) < TOKENS
    chunks = list(ee.stream(PROMPT, method="full", max_new_tokens=TOKENS, stop=stop))
    assert "".join(c.text for c in chunks) == out.text
    assert not any(stop in c.text for c in chunks)
    assert chunks[-1].generation.finish_reason == "stop"


def test_text_assembly_holds_back_split_characters_and_stop_prefixes(ee: EarlyExit) -> None:
    text = "Crème brûlée costs 5€ — 你好, 🎉 done. STOP after"
    ids = ee.tokenizer(text, add_special_tokens=False)["input_ids"]
    for stop, expected in [((), text), (("STOP",), text[: text.index("STOP")])]:
        assembler = TextAssembler(ee.tokenizer, stop)
        pieces = []
        for token in ids:
            assembler.push(token, 30)
            pieces.append(assembler.release())
            assert "\ufffd" not in pieces[-1]  # never half a character
        pieces.append(assembler.release(final=True))
        assert "ST" not in "".join(pieces) or not stop  # a stop's prefix was held back
        assert "".join(pieces) == expected == assembler.text
        assert assembler.stopped == bool(stop)


def test_static_reports_its_shallow_exit_and_readout(ee: EarlyExit) -> None:
    out = ee.generate(PROMPT, method="static", max_new_tokens=6)
    report = out.report
    assert report.exit_layers == [24] * 6 and report.shallow_fraction == 1
    assert report.shallow_layer == 24 and report.avg_layers == 24
    assert report.artifacts["shallow_exit"].startswith("layer 24: logit lens (untrained")


def test_calm_decodes_as_a_batch_row_and_reports_its_exits(ee: EarlyExit) -> None:
    """`calm` is a row of the scheduler's batch (CALM per row: runtime/scheduler.py); with
    its exit tried at every step it exits at layer 24 where the lens is confident."""
    out = ee.generate(PROMPT, method="calm:0.3", max_new_tokens=12, exits="always")
    report = out.report
    assert report.batched and report.shallow_layer == 24 and report.threshold == 0.3
    assert set(report.exit_layers) <= {24, 30} and 0 < report.shallow_fraction < 1
    assert report.avg_layers < 30  # exited tokens ran 24 layers, no catch-up


def test_a_certified_threshold_is_the_one_reported(ee: EarlyExit) -> None:
    """With `risk`, calm's threshold is what Learn-then-Test chose, and the report says that
    threshold (not the tolerance-calibrated one the same prompts would give)."""
    knobs = {"risk": 0.5, "delta": 0.5, "calibration_prompts": 2, "calibration_tokens": 4}
    out = ee.generate(PROMPT, method="calm", max_new_tokens=4, **knobs)
    ltt = out.report.ltt
    assert ltt is not None and ltt["n"] == 2 and ltt["risk"] == 0.5
    assert out.report.threshold == ltt["setting"]


def test_sampling_is_reproducible_with_a_seed(ee: EarlyExit) -> None:
    kwargs = {"method": "full", "max_new_tokens": 8, "temperature": 0.9, "seed": 3}
    first = ee.generate(PROMPT, **kwargs)
    assert ee.generate(PROMPT, **kwargs).tokens == first.tokens
    assert [t for c in ee.stream(PROMPT, **kwargs) for t in c.tokens] == first.tokens


def test_bad_input_fails_before_any_model_work(
    ee: EarlyExit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args: object) -> None:
        raise AssertionError("a decoder was built for a bad request")

    monkeypatch.setattr(ee, "_built", no_work)
    for kwargs, message in [
        ({"method": "fastest"}, "unknown generation method 'fastest'"),
        ({"method": "lossless:ngram:9"}, "N: 1..7"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"method": "hf", "temperature": 0.5}, "greedy only"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"shallow_layer": 30}, "shallow_layer must be an integer in 1..29"),
        ({"draft_token": 3}, "unknown generate option 'draft_token'"),
        ({"exits": "often"}, "exits must be measured or always, not 'often'"),
        ({"calibration_prompts": 0}, "calibration_prompts must be an integer >= 1"),
        ({"risk": 1.5}, "must lie in"),
        ({"max_stack": 0}, "max_stack must be an integer >= 1"),
    ]:
        for call in (ee.generate, ee.stream):  # a stream checks when it is made
            with pytest.raises(EarlyExitError, match=message):
                call(PROMPT, **kwargs)
    for prompt in ("", "  \n"):
        with pytest.raises(EarlyExitError, match="the prompt is empty"):
            ee.generate(prompt)
    for kwargs, message in [
        ({"task": "sst3"}, "unknown task 'sst3'"),
        ({"method": "adainfer:x"}, "bad argument in method 'adainfer:x'"),
        ({"method": "fastest"}, "unknown method 'fastest'"),
        ({"task": "reviews.csv"}, "needs labels="),
        ({"task": None}, "task=None needs labels="),
        ({"readout": "magic"}, "unknown readout 'magic'"),
        ({"method": "raee", "embedder": "backbone:99"}, "unknown embedder 'backbone:99'"),
    ]:
        with pytest.raises(EarlyExitError, match=message):
            ee.classify(REVIEWS, **kwargs)
    with pytest.raises(EarlyExitError, match="non-empty list of strings"):
        ee.classify([])
    for kwargs, message in [
        ({"dtype": "int3"}, "unknown dtype 'int3'"),
        ({"kernels": "fast"}, "unknown kernels 'fast'"),
        ({"compiled": "fast"}, "unknown compiled mode 'fast': use auto, on, off"),
        ({"threads": 0}, "threads must be a positive integer"),
    ]:
        with pytest.raises(EarlyExitError, match=message):
            EarlyExit.load("smollm2-135m", **kwargs)
    with pytest.raises(EarlyExitError, match="unknown model"):
        EarlyExit.load("no-such-model")
    assert not _stream_threads()


def test_a_stream_stopped_early_leaves_no_worker(ee: EarlyExit) -> None:
    stream = ee.stream(PROMPT, method="full", max_new_tokens=64)
    assert not _stream_threads()  # nothing runs before the first next()
    assert next(stream).tokens
    began = time.perf_counter()
    stream.close()
    assert not _stream_threads() and time.perf_counter() - began < 10
    with pytest.raises(StopIteration):
        next(stream)
    dropped = ee.stream(PROMPT, method="full", max_new_tokens=64)
    next(dropped)
    del dropped  # abandoned mid-way, never closed: cancelled when collected
    gc.collect()
    deadline = time.perf_counter() + 30
    while _stream_threads() and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not _stream_threads()
    with ee.stream(PROMPT, method="full", max_new_tokens=64) as chunks:
        next(chunks)
    assert not _stream_threads()
    assert len(ee.generate(PROMPT, method="full", max_new_tokens=2).tokens) == 2  # lock free


def test_stream_errors_reach_the_consumer(ee: EarlyExit, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in a decode that runs alone (under the lock), and in the scheduler's loop
    (a batched method), is raised in the consumer; no worker is left behind."""
    monkeypatch.setattr(ee, "_built", lambda request: _fake(ee, fail=RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        list(ee.stream(PROMPT, method="static"))
    monkeypatch.undo()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bang")

    monkeypatch.setattr(ee.engine, "run_rows", broken)
    with pytest.raises(RuntimeError, match="bang"):
        list(ee.stream(PROMPT, method="full", max_new_tokens=4))
    assert not _stream_threads()
    monkeypatch.undo()
    assert ee.scheduler_stats().running == 0
    assert len(ee.generate(PROMPT, method="full", max_new_tokens=3).tokens) == 3  # it lives


def test_requests_decoding_alone_are_serialized(
    ee: EarlyExit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Methods outside the scheduler (here `static`) take the model's lock in turn."""
    active, most = [0], [0]
    built = _fake(ee, delay=0.01)
    inner = built.decoder

    def counting(prompt: str, config) -> DecodeResult:  # noqa: ANN001
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            return inner(prompt, config)
        finally:
            active[0] -= 1

    monkeypatch.setattr(
        ee, "_built", lambda request: BuiltDecoder(counting, None, {}, lambda: None)
    )
    results: list[str] = []

    def generate() -> None:
        results.append(ee.generate(PROMPT, method="static").text)

    def stream() -> None:
        results.append("".join(c.text for c in ee.stream(PROMPT, method="static")))

    workers = [threading.Thread(target=f) for f in (generate, stream, generate, stream)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert most[0] == 1 and results == ["one two three four"] * 4


def test_what_requests_leave_behind_is_bounded(ee: EarlyExit) -> None:
    """Decoders are kept per (method, knobs), which clients choose: at most `limit` stay,
    the least recently used going first, and a dropped one is rebuilt when asked again."""
    limit, ee._decoders.limit = ee._decoders.limit, 3
    try:
        for layer in (10, 12, 14, 16, 12):
            out = ee.generate(PROMPT, method="static", shallow_layer=layer, max_new_tokens=1)
            assert out.report.exit_layers == [layer]
        assert len(ee._decoders) == 3
        kept = {b.shallow.layer for b in ee._decoders.values() if b.shallow is not None}
        assert kept == {12, 14, 16}  # 10 went first; 12 was used again
    finally:
        ee._decoders.limit = limit


def test_kept_drops_the_least_recently_used() -> None:
    kept: Kept[int] = Kept(2)
    kept.put("a", 1)
    kept.put("b", 2)
    assert kept.get("a") == 1  # a is now the most recent
    kept.put("c", 3)
    assert "b" not in kept and kept.get("b") is None and kept.values() == [1, 3]
    with pytest.raises(ValueError, match="at least one"):
        Kept(0)


@pytest.fixture(scope="module")
def sst2(ee: EarlyExit):  # noqa: ANN201 - a Classification
    return ee.classify(REVIEWS, task="sst2", method="adainfer", calibration=24)


def _task_state(ee: EarlyExit, task: str, calibrated: bool = True):  # noqa: ANN202
    """The object's kept state for one task (demonstrations, candidates, readout, policies)."""
    (state,) = [
        s
        for s in ee._classifier.tasks.values()
        if s.task.name == task and (s.builder is not None) == calibrated
    ]
    return state


def _states(ee: EarlyExit, state) -> torch.Tensor:  # noqa: ANN001
    """Every layer's last-position state for each review's prompt, [review, layer, hidden]:
    one plain full-depth pass, not the policy run."""
    prompts = [state.task.prompt(Example(text, 0), state.demos) for text in REVIEWS]
    return collect_states(ee.engine, prompts)


def _readout_argmax(states: torch.Tensor, state, scores: Callable, layers: list[int]) -> list[int]:  # noqa: ANN001
    """Per review, the class `scores(hidden, layer, candidates)` puts first at the given
    layer (from `_states`): what a classification's labels are checked against."""
    return [
        int(scores(states[i, layer - 1 : layer], layer, state.candidates).argmax())
        for i, layer in enumerate(layers)
    ]


@pytest.fixture(scope="module")
def sst2_states(ee: EarlyExit, sst2) -> torch.Tensor:  # noqa: ANN001
    """`_states` of the SST-2 prompts the fixture classified (its 4 demonstrations)."""
    return _states(ee, _task_state(ee, "sst2"))


def _own_head(ee: EarlyExit) -> Callable:
    """The model's own readout at any layer: final norm + LM head over the candidates."""
    return lambda hidden, layer, candidates: ee.engine.logits(hidden, candidates)


def test_classify_sst2_labels_each_text_and_names_its_artifacts(
    ee: EarlyExit,
    sst2,  # noqa: ANN001
    sst2_states: torch.Tensor,
) -> None:
    assert len(sst2.labels) == len(sst2.classes) == len(sst2.exit_layers) == len(REVIEWS)
    assert sst2.labels[:6] == GOLD  # it reads the reviews
    assert [["negative", "positive"][c] for c in sst2.classes] == sst2.labels
    # each label is the task probe's argmax at the layer the review exited at
    state = _task_state(ee, "sst2")
    layers = sst2.exit_layers
    assert sst2.classes == _readout_argmax(sst2_states, state, state.readout.logits, layers)
    assert all(1 <= layer <= 30 for layer in sst2.exit_layers)
    report = sst2.report
    assert report.avg_layers == sum(sst2.exit_layers) / len(REVIEWS)
    assert report.layers_saved == pytest.approx(1 - report.avg_layers / 30)
    assert report.task == "sst2" and report.shots == 4 and report.seconds > 0
    assert report.artifacts["readout"] == "task probe fitted on 24 train prompts (in memory)"
    assert report.artifacts["stopper"] == "SVM stopper fitted on 24 calibration traces"
    assert report.artifacts["general_readout"].startswith("logit lens (untrained")
    again = ee.classify(REVIEWS, task="sst2", method="adainfer", calibration=24)
    assert again.classes == sst2.classes and again.exit_layers == sst2.exit_layers
    assert again.report.setup_seconds < 0.05 * report.setup_seconds  # kept, not refitted


def test_classify_with_the_models_own_head(ee: EarlyExit) -> None:
    """readout='lens' reads every layer through the model's own norm and head (RAEE's
    paper protocol): at full depth it is the model's own label-word argmax."""
    lens = ee.classify(REVIEWS, task="sst2", method="full", readout="lens", shots=0)
    assert lens.report.artifacts["readout"].startswith("logit lens: the model's own norm")
    assert lens.labels[:6] == GOLD and lens.exit_layers == [30] * len(REVIEWS)
    engine, task = ee.engine, get_task("sst2")
    ids = task.label_token_ids(engine.tokenizer)
    for text, cls in zip(REVIEWS, lens.classes, strict=True):
        prompt = task.prompt(Example(text, 0))
        logits = engine.logits(engine.prefill(engine.encode([prompt])[0]).hidden[:, -1])
        assert cls == int(logits[0, ids].argmax())


def test_classify_loads_a_saved_raee_database(
    smol: LayerEngine,
    ee: EarlyExit,
    sst2,  # noqa: ANN001
    sst2_states: torch.Tensor,
) -> None:
    # save what `earlyexit raee build` saves, from the calibration the fixture ran
    state = _task_state(ee, "sst2")
    path = home() / "raee" / "smollm2-135m" / "sst2"
    state.builder.database().save(path)
    state.readout.save(path / "probe")
    try:
        fresh = EarlyExit.from_engine(smol)
        out = fresh.classify(REVIEWS, task="sst2", method="raee", calibration=24)
        assert out.report.artifacts["database"] == (
            f"RAEE database loaded from {path} (24 examples)"
        )
        assert out.report.artifacts["readout"] == f"task probe loaded from {path / 'probe'}"
        assert out.report.artifacts["embedder"] == "minilm-l6"
        assert all(1 <= layer <= 30 for layer in out.exit_layers)
        assert len(out.labels) == len(REVIEWS) and out.labels[:6] == GOLD
        loaded = _task_state(fresh, "sst2", calibrated=False)  # nothing calibrated
        assert loaded.demos == state.demos  # the same prompts as the fixture's
        readout, policy, _ = loaded.policies["raee"]
        # the exits are the database's plan for these reviews, and each label is the loaded
        # probe's argmax at its review's exit layer
        assert policy.plan(REVIEWS).tolist() == out.exit_layers
        layers = out.exit_layers
        assert out.classes == _readout_argmax(sst2_states, loaded, readout.logits, layers)
    finally:
        shutil.rmtree(home() / "raee", ignore_errors=True)


def test_zero_shot_label_map(ee: EarlyExit) -> None:
    labels = {"0": "negative", "1": "positive"}
    out = ee.classify(REVIEWS, task=None, labels=labels, method="full")
    assert out.labels[:6] == GOLD and out.exit_layers == [30] * len(REVIEWS)
    assert out.report.shots == 0 and out.report.avg_layers == 30
    # full depth: the model's own head (final norm + LM head) over the two label words
    state = _task_state(ee, "labels", calibrated=False)
    assert [w.strip() for w in state.task.label_words] == ["negative", "positive"]
    own = [30] * len(REVIEWS)
    assert out.classes == _readout_argmax(_states(ee, state), state, _own_head(ee), own)
    with pytest.raises(EarlyExitError, match="pass a labelled file"):
        ee.classify(REVIEWS, task=None, labels=labels, method="adainfer")


def test_a_labelled_file_as_task(ee: EarlyExit, tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    words = ["great", "awful", "lovely", "boring", "superb", "tedious"]
    # varied sentences: on "the {i}th film was {word}" rows the model says "negative" to
    # every calibration prompt, so the probe distilled from it knows one class and AdaInfer
    # answers "negative" to everything at layer 1
    templates = ["a {} film", "the acting was {}", "a {} story from start to end"]
    templates += ["{} from the first minute", "the plot is {}", "what a {} movie"]
    templates += ["the ending was {}", "{} and well made", "a {} cast", "{} says the critic"]
    rows = [
        f"{template.format(w)},{'pos' if j % 2 == 0 else 'neg'}"
        for template in templates
        for j, w in enumerate(words)
    ]
    data.write_text("review,stars\n" + "\n".join(rows) + "\n")
    labels = {"neg": "negative", "pos": "positive"}
    out = ee.classify(
        REVIEWS, task=data, labels=labels, text_column="review", label_column="stars", shots=2
    )  # adainfer, calibrated on the demonstration pool (a fifth: 12 rows) less the 2 shown
    assert out.report.task == "reviews" and out.report.shots == 2
    assert out.labels[:6] == GOLD and len(out.exit_layers) == len(REVIEWS)
    assert out.report.artifacts["readout"] == "task probe fitted on 10 train prompts (in memory)"
    state = _task_state(ee, "reviews")
    states = _states(ee, state)
    assert out.classes == _readout_argmax(states, state, state.readout.logits, out.exit_layers)
    with pytest.raises(EarlyExitError, match="no column 'text'"):
        ee.classify(REVIEWS, task=str(data), labels=labels, method="full")


def test_adapter_methods_name_their_draft_block(
    smol: LayerEngine, ee: EarlyExit, full: Generation
) -> None:
    """`:adapter` methods read the draft block saved for the model, or fail in one line
    naming the command that trains one; the report names the block and where it came from."""
    from earlyexit.readouts.draft_block import (
        BlockConfig,
        BlockTrainResult,
        DraftBlock,
        block_dir,
        save_block,
    )

    layer = smol.num_layers - 2
    with pytest.raises(EarlyExitError, match="heads train-block"):
        ee.generate(PROMPT, method="lossless:adapter", max_new_tokens=4)
    block = DraftBlock(smol, layer)  # untrained: the identity, then an identity map
    block.vocabulary = torch.arange(smol.vocab_size)
    path = save_block(BlockTrainResult(block, BlockConfig(), 0.0, 0.5), block_dir(smol, layer))
    try:
        out = ee.generate(PROMPT, method="lossless:adapter", max_new_tokens=TOKENS)
        assert out.tokens == full.tokens  # lossless whatever the drafts
        assert out.report.artifacts["shallow_exit"] == (
            f"layer {layer}: draft block ({path}), held-out top-1 agreement 50.0%"
        )
        assert out.report.threshold is not None and out.report.draft_proposed > 0
    finally:
        shutil.rmtree(path)
