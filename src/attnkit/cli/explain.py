"""``attnkit explain``: run a model on a text and show what it attends to: the tokens, the
top attended tokens per layer, the heads that stand out, and each head role's best heads;
write a self-contained HTML report (with what attention costs in the model at this length,
unless --no-cost) and, on request, PNG heatmaps.

With --compare OTHER and one --token WORD: the word in two contexts. The report shows both
sentences' explorers, where WORD attends in each, per layer and in its best head, and the
cosine similarity of WORD's hidden state between the sentences, layer by layer, against that of
every word both share (the most frequent shared word token other than WORD, or --anchor, drawn
and tabled beside it); the terminal states the rule and says after which layers WORD moves more
than every shared word; --png DIR writes the cosines as DIR/cosine.png.

With --target "..." (an encoder-decoder model folder, e.g. BART or Marian): TEXT is the source,
the target is read teacher-forced, and the report shows the cross-attention (each target token's
lines to the source tokens, and the alignment heatmap: rows target, columns source) beside the
encoder's and decoder's self-attention; --png DIR writes DIR/alignment.png.

With --generate N (a model that generates): greedy generation of N tokens from TEXT; the report
shows the text growing token by token, and where each generated token looked.

With --long FILE (instead of TEXT): a long document, up to the model's context window (32K tokens and
more: no (L x L) map is stored). The terminal shows each layer's sink mass, entropy and attention
distance; the report is the long explorer (a layers x heads grid, the mass each token receives along the
document, the text, and each query's top keys). `attnkit serve --long FILE` zooms on exact weights
instead. See docs/long-explorer.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnkit import _model_facts as facts
from attnkit._format import size
from attnkit.cli._common import Column, Console, Parser, Subparsers, UsageError, csv, positive, quiet_transformers

if TYPE_CHECKING:  # imported where used, so that `attnkit --help` stays fast
    from torch import Tensor, nn

    from attnkit.inspect import AttentionMaps


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("explain", help="what a model attends to in a text: terminal summary, HTML report, PNGs",
                       description=__doc__)
    p.add_argument("text", nargs="?", default=None, help="the input text (leave it out with --long FILE)")
    p.add_argument("--model", default="minilm",
                   help="'minilm' (bundled all-MiniLM-L6-v2, the hf extra) or a local Hugging Face model folder")
    p.add_argument("--out", default="report.html", help="the HTML report to write ('' for none)")
    p.add_argument("--png", default=None, metavar="DIR", help="also write static heatmaps into DIR")
    p.add_argument("--layers", type=csv(int), default=None, help="layers to capture, from 0, e.g. 0,5 (default: all)")
    p.add_argument("--heads", type=csv(int), default=None, help="heads to capture, from 0, e.g. 0,3 (default: all)")
    p.add_argument("--token", action="append", default=None,
                   help="a token of interest: its text (every occurrence) or #N for position N (from 0); "
                        "repeatable (default: all tokens)")
    p.add_argument("--top", type=int, default=3, help="attended tokens listed per layer")
    p.add_argument("--keep-special", action="store_true",
                   help="list special tokens ([CLS], [SEP], ...) among the attended tokens too")
    p.add_argument("--max-rows", type=int, default=64, help="tokens listed at most")
    modes = p.add_argument_group("other modes", "instead of one text's self-attention (they exclude each other)")
    modes.add_argument("--compare", metavar="OTHER", default=None,
                   help="a second text: compare how the model reads --token in the two (one --token needed)")
    modes.add_argument("--anchor", default=None,
                   help="with --compare: the shared word to compare against (default: the most frequent word token "
                        "both texts share, other than --token)")
    p.add_argument("--probe", metavar="ROLE", default=None,
                   help="also score the heads for a self-attention head role (induction, previous_token, ...) on "
                        "its standard probe, and print its top heads: random tokens, repeated once for induction "
                        "and duplicate_token (Olsson et al. 2022)")
    p.add_argument("--no-cost", dest="cost", action="store_false",
                   help="leave out the report's cost section (by default the report has one: a quick profile of the "
                        "model at this input's length and a few longer ones, a few seconds on a CPU)")
    modes.add_argument("--target", default=None,
                   help="encoder-decoder models: the target text (TEXT is the source); the report shows "
                        "cross-attention")
    modes.add_argument("--generate", type=positive, default=None, metavar="N",
                   help="generate N tokens greedily from TEXT and show where each one looked")
    modes.add_argument("--long", default=None, metavar="FILE",
                   help="a long document (a UTF-8 text file) instead of TEXT: exact statistics without maps, and "
                        "the long explorer as the report")
    p.add_argument("--top-k", type=positive, default=5,
                   help="with --long: the keys per query the report keeps (each adds about 4 bytes per query and "
                        "head to the page)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from attnkit import models

    _check_options(args)
    con = Console()
    quiet_transformers()
    with con.status(f"loading {args.model}..."):
        model, tokenizer = models.load(args.model)
    if args.long is not None:
        return _long(args, con, model, tokenizer)
    if args.target is not None:
        return _seq2seq(args, con, model, tokenizer)
    if args.generate is not None:
        return _generate(args, con, model, tokenizer)
    if args.compare is not None:
        return _compare(args, con, (model, tokenizer))
    return _self_attention(args, con, model, tokenizer)


def _check_options(args: argparse.Namespace) -> None:
    """Options that do not go together, and outputs that cannot be written, refused before the model loads."""
    if args.long is not None:
        _check_long(args)
    elif args.text is None:
        raise UsageError("the following arguments are required: text (or --long FILE for a long document)")
    if args.png:
        from attnkit._plot import pyplot

        pyplot()  # fail now, not after the model ran, when matplotlib is missing
    if args.out and not Path(args.out).resolve().parent.is_dir():  # the one check the report cannot make early
        raise ValueError(f"--out {args.out!r}: the folder {str(Path(args.out).resolve().parent)!r} does not exist")
    if args.probe is not None:
        from attnkit.viz.explainer import PROBES

        if args.probe not in PROBES:
            raise UsageError(f"--probe must be a self-attention head role, one of {', '.join(PROBES)}; got "
                             f"{args.probe!r}")
    mode = "--target" if args.target is not None else "--generate" if args.generate is not None else None
    if mode is not None:
        if args.target is not None and args.generate is not None:
            raise UsageError("--target and --generate do not go together: --target reads a given target, "
                             "--generate makes one")
        others = [name for name, value in (("--compare", args.compare), ("--layers", args.layers),
                                           ("--heads", args.heads), ("--token", args.token),
                                           ("--probe", args.probe)) if value is not None]
        if others:
            raise UsageError(f"{others[0]} does not go with {mode}")
    if args.compare is not None and args.probe is not None:
        raise UsageError("--probe does not go with --compare: run the probe on its own, "
                         f"attnkit explain TEXT --probe {args.probe}")
    if args.compare is None and args.anchor is not None:
        raise UsageError("--anchor only goes with --compare OTHER --token WORD")
    if args.compare is not None and (not args.token or len(args.token) != 1):
        raise UsageError(f"--compare needs exactly one --token WORD to compare (e.g. --token bank); got "
                         f"{len(args.token or [])} --token")


def _check_long(args: argparse.Namespace) -> None:
    """--long FILE goes alone: no TEXT and no other mode; the file is read now, before the model loads."""
    from attnkit.viz.long import read_text

    given = [name for name, value in (("TEXT", args.text), ("--compare", args.compare), ("--target", args.target),
                                      ("--generate", args.generate), ("--layers", args.layers), ("--heads", args.heads),
                                      ("--token", args.token), ("--png", args.png)) if value is not None]
    if given:
        raise UsageError(f"{given[0]} does not go with --long FILE (the document is the file's text)")
    args.long_text = read_text(args.long)


def _long(args: argparse.Namespace, con: Console, model: nn.Module, tokenizer: Any) -> int:
    """``explain --long FILE``: a long document's statistics, per layer in the terminal, and the long explorer."""
    from attnkit.viz.long import LongDocument, write_long_report

    with con.progress() as progress:
        doc = LongDocument(model, tokenizer, args.long_text, top_k=args.top_k, progress=progress)
    st, window = doc.stats, doc.stats.context_window
    con.rule(f"{st.model_name}: {doc.length:,} tokens of {args.long} (context window "
             f"{'stated by none' if window is None else f'{window:,}'}), {len(st.layers)} layers x "
             f"{st.received.shape[1]} heads")
    rows = []
    for n, layer in enumerate(st.layers):
        sink, ent, dist = st.sink_share[n], st.mean_entropy[n], st.mean_distance[n]
        rows.append((str(layer), f"{float(sink.mean()):.3f}", f"{float(sink.max()):.3f} H{int(sink.argmax())}",
                     f"{float(ent.mean()):.2f}", f"{float(dist.mean()):.1f}",
                     f"{float(dist.min()):.1f} H{int(dist.argmin())}"))
    con.table(f"per layer, mean over heads and the standout head (sink: mass on the first {st.sinks} tokens)",
              ("layer", Column("sink", right=True), Column("top sink", right=True), Column("entropy", right=True),
               Column("distance", right=True), Column("most local", right=True)), rows)
    heavy = st.received.double().mean((0, 1)).topk(min(5, doc.length))
    con.print("tokens that receive the most (mean over layers and heads): " + "  ".join(
        f"{j}:{st.tokens[j]} {float(v):.1f}" for v, j in zip(heavy.values, heavy.indices.tolist())))
    if args.out:
        path = write_long_report(doc.data(), args.out)
        con.print(f"wrote {path} ({size(path.stat().st_size)}): the long explorer; open it in a browser; it needs "
                  "no network. `attnkit serve --long FILE` zooms on exact weights")
    return 0


def _self_attention(args: argparse.Namespace, con: Console, model: nn.Module, tokenizer: Any) -> int:
    """``explain TEXT``: the terminal summary, the report and the PNGs of a self-attention model."""
    from attnkit.viz import explainer as ex

    with con.progress() as progress:
        maps = ex.explain(args.text, (model, tokenizer), layers=args.layers, heads=args.heads,
                          progress=lambda done, total: progress("capturing attention", done, total))
    # Heads 0..k-1 of a model look like a whole model in the maps: roll out only every head.
    model_heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    whole = args.heads is None or (model_heads is not None and sorted(set(args.heads)) == list(range(model_heads)))
    tokens = maps.tokens[0]
    wanted = _wanted(tokens, args.token)
    summary = ex.summarize(maps, tokens=wanted, k=args.top, max_rows=args.max_rows, skip_special=not args.keep_special)
    _print_summary(con, args, maps, summary)
    if args.probe:
        _print_probe(con, args.probe, (model, tokenizer))
    if args.out:
        _write_report(con, args, model, maps, summary, wanted, whole)
    if args.png:
        from attnkit.viz.png import save_pngs

        with con.progress() as progress:
            paths = save_pngs(maps, args.png, rollout=whole, progress=progress)
        con.print(f"wrote {len(paths)} heatmaps to {args.png}: " + ", ".join(p.name for p in paths))
    return 0


def _print_summary(con: Console, args: argparse.Namespace, maps: AttentionMaps, summary: Any) -> None:
    tokens = maps.tokens[0]
    con.rule(f"{maps.model_name}: {len(tokens)} tokens, {len(maps.layers)} layers x {len(maps.heads)} heads")
    con.print("  ".join(f"{i}:{t}" for i, t in enumerate(tokens)))
    more = "" if summary.shown == summary.total else f" (first {summary.shown} of {summary.total}; pick with --token)"
    heads_note = "all heads" if args.heads is None else "heads " + ",".join(map(str, maps.heads))
    con.table(f"top {args.top} attended tokens per layer, mean of {heads_note}{more}",
              ("token", *(f"layer {layer}" for layer in maps.layers)), _layer_rows(summary))
    if summary.skipped_keys:
        con.print("special tokens left out of the lists (heads park weight there): "
                  + " ".join(sorted({tokens[j] for j in summary.skipped_keys})) + "; --keep-special lists them")
    if summary.heads:
        con.table("heads most specific to the chosen tokens: the token's weight on a key (more than 2 tokens away) "
                  "against that key's column mean, the weight the average query gives it",
                  ("token", "layer.head", "looks at", Column("weight", right=True), Column("col mean", right=True),
                   Column("ratio", right=True), Column("diff", right=True), "column head?"),
                  [(f"{h.query} {tokens[h.query]}", f"L{h.layer}.H{h.head}", f"{h.key} {tokens[h.key]}",
                    f"{h.weight:.3f}", f"{h.column_mean:.3f}", f"{h.ratio:.1f}x", f"{h.difference:+.3f}",
                    _column_note(h, tokens))
                   for h in summary.heads])
    con.table("heads that score highest in each role (rows: the query rows each score rests on)",
              ("role", Column("mean", right=True), Column("rows", right=True), "top heads (layer.head score)"),
              _role_rows(summary.roles))
    for role, why in summary.roles.skipped.items():
        con.print(f"skipped {role}: {why}")


def _column_note(h: Any, tokens: list[str]) -> str:
    """The "column head?" cell: whether most queries look at one key, and whether it is this key."""
    if not h.column_head:
        return ""
    if h.column_key == h.key:
        return f"yes, on {tokens[h.key]}: its weight is everyone's"
    return f"yes, on {tokens[h.column_key]}, not {tokens[h.key]}"


# The roles whose telling heads score lowest (local heads, sharp heads): listed lowest first.
_LOWEST = frozenset({"mean_distance", "normalized_entropy"})


def _print_probe(con: Console, role: str, model: tuple[nn.Module, Any]) -> None:
    """``--probe ROLE``: the heads' scores for ROLE on its standard probe."""
    from attnkit.viz.explainer import PROBES, probe, uniform_score

    with con.status(f"running the {role} probe ({PROBES[role]})..."):
        maps, roles = probe(role, model)
    lowest = role in _LOWEST
    even = uniform_score(maps, role)
    con.table(f"{role} on its standard probe: {PROBES[role]}, {len(maps.tokens[0])} tokens, scored on "
              f"{roles.evidence_text(role)}" + (" (lowest first)" if lowest else ""),
              ("layer.head", Column("score", right=True), Column("x even", right=True)),
              [(f"L{lay}.H{hd}", f"{sc:.3f}", f"{sc / even:.1f}x" if even > 0 else "")
               for lay, hd, sc in roles.top(role, 5, largest=not lowest)])
    con.print(f"(x even: the score against {even:.3f}, what a head that spread each query's weight evenly over the "
              "keys it sees would score on the same tokens)")


def _layer_rows(summary: Any) -> list[tuple[str, ...]]:
    """One row per listed token: its top attended tokens in each layer, ``key .42`` a line."""
    return [(f"{i} {tok}", *("\n".join(f"{key} {w:.2f}".replace(" 0.", " .") for _, key, w in tops)
                              for tops in per_layer)) for i, tok, per_layer in summary.rows]


def _role_rows(roles: Any) -> list[tuple[str, str, str, str]]:
    """One row per head role: its mean score over heads, the rows it rests on and its top three heads (the
    lowest, for distance and entropy, where the telling heads are the lowest)."""
    return [(role + (" (lowest)" if role in _LOWEST else ""), f"{float(scores.nanmean()):.3f}",
             str(roles.evidence.get(role, "")),
             "\n".join(f"L{lay}.H{hd} {sc:.3f}" for lay, hd, sc in roles.top(role, 3, largest=role not in _LOWEST)))
            for role, scores in roles.scores.items()]


def _write_report(con: Console, args: argparse.Namespace, model: nn.Module, maps: AttentionMaps, summary: Any,
                  wanted: list[int] | None, whole: bool) -> None:
    from attnkit.viz import report

    view, why = _opening_head(maps, summary)
    cost = None
    if args.cost:
        from attnkit.viz.cost import cost_data

        with con.status("timing the model for the report's cost section (--no-cost skips it)..."):
            try:
                cost = cost_data(model, len(maps.tokens[0]))
            except ValueError as err:  # a model whose attention cannot be timed: the maps still stand
                con.print(f"the report has no cost section: {err}")
    with con.progress() as progress:
        path = report.write_report(maps, args.out, title=args.text, focus=wanted[0] if wanted else None,
                                   view=view, view_reason=why, rollout=whole, roles=summary.roles, cost=cost,
                                   progress=progress)
    con.print(f"wrote {path} ({size(path.stat().st_size)}): open it in a browser; it needs no network")
    if why:
        con.print(why)


def _wanted(tokens: list[str], queries: list[str] | None) -> list[int] | None:
    """Positions of the tokens that ``--token`` names, in order, each once; None for all."""
    if not queries:
        return None
    from attnkit.viz.explainer import find_tokens

    wanted: list[int] = []
    for query in queries:
        found = find_tokens(tokens, query)
        if not found:
            raise ValueError(f"--token {query!r} matches no token; the tokens are "
                             + " ".join(tokens[:80]) + (" ..." if len(tokens) > 80 else ""))
        wanted.extend(i for i in found if i not in wanted)
    return wanted


def _opening_head(maps: AttentionMaps, summary: Any) -> tuple[tuple[int, list[int]] | None, str | None]:
    """(layer, [head]) to open the report on for the first chosen token, and why in words: its most specific
    head (the first of ``summary.heads``); (None, None) without chosen tokens."""
    if not summary.heads:
        return None, None
    best = summary.heads[0]
    return (best.layer, [best.head]), best.why(maps.tokens[0])


def _compare(args: argparse.Namespace, con: Console, model: tuple[nn.Module, Any]) -> int:
    """``explain TEXT --compare OTHER --token WORD``: the word in two contexts."""
    from attnkit.viz import contexts

    with con.status("running both texts..."):
        try:
            found = contexts.compare_contexts(args.text, args.compare, args.token[0], model, anchor=args.anchor)
        except contexts.TokenNotFound as err:
            where = "TEXT" if err.sentence == args.text else "--compare"
            raise UsageError(f"--{err.argument} {err.word!r} is not a token of the {where} text {err.sentence!r}; "
                             f"its tokens are " + " ".join(err.tokens)) from None
    tok, anc = found.token, found.anchor
    con.rule(f"{found.maps[0].model_name}: '{tok}' in two contexts, against '{anc}'")
    lowest = [min(c[n] for c in found.baseline().values()) for n in range(len(found.token_cosine))]
    rows = [(str(layer), f"{found.token_cosine[n + 1]:.3f}", f"{found.anchor_cosine[n + 1]:.3f}",
             f"{lowest[n + 1]:.3f}",
             *(f"{a[n]['mean'][0][0]} {a[n]['mean'][0][1]:.2f}; H{a[n]['head']}: {a[n]['head_key']} "
               f"{a[n]['head_weight']:.2f}" for a in found.attends))
            for n, layer in enumerate(found.maps[0].layers)]
    con.table(f"cosine of the hidden state between the texts, and where '{tok}' attends (top key of the mean of "
              "the heads; the best head's key)",
              ("layer", Column(f"cos {tok}", right=True), Column(f"cos {anc}", right=True),
               Column("lowest shared", right=True), "in TEXT", "in --compare"),
              [("emb", f"{found.token_cosine[0]:.3f}", f"{found.anchor_cosine[0]:.3f}", f"{lowest[0]:.3f}", "", ""),
               *rows])
    con.print(found.rule())
    con.print(found.summary())
    if args.out:
        path = contexts.write_compare_report(found, args.out)
        con.print(f"wrote {path} ({size(path.stat().st_size)}): both texts' explorers; it needs no network")
    if args.png:
        Path(args.png).mkdir(parents=True, exist_ok=True)
        con.print(f"wrote {found.plot(Path(args.png) / 'cosine.png')}")
    return 0


def _top(row: Tensor, names: list[str], k: int) -> str:
    order = row.double().argsort(descending=True)[:k].tolist()
    return "  ".join(f"{names[j]} {float(row[j]):.2f}".replace(" 0.", " .") for j in order)


def _seq2seq(args: argparse.Namespace, con: Console, model: nn.Module, tokenizer: Any) -> int:
    """``explain SOURCE --target TARGET``: cross-attention of an encoder-decoder model."""
    from attnkit.inspect import Seq2SeqMaps, capture
    from attnkit.viz import report

    kind = facts.kind(model)
    if kind != "encoder-decoder":
        raise UsageError(f"--target needs an encoder-decoder model (BART, T5, Marian...); {args.model!r} is "
                         f"{'a' if kind == 'decoder' else 'an'} {kind}-only model"
                         + (": try --generate N" if kind == "decoder" else ""))
    with con.status("capturing attention..."):
        maps = capture(model, args.text, target=args.target, tokenizer=tokenizer)
    assert isinstance(maps, Seq2SeqMaps), "capture gives Seq2SeqMaps for a model whose config is_encoder_decoder"
    cross = maps.cross
    target, source = cross.tokens[0], cross.keys[0]
    con.rule(f"{cross.model_name}: {len(source)} source tokens -> {len(target)} target tokens, "
             f"{len(cross.layers)} layers x {len(cross.heads)} heads")
    rows = [(f"{i} {tok}", *(_top(cross.attentions[0][li, :, i].float().mean(0), source, args.top)
                             for li in range(len(cross.layers))))
            for i, tok in enumerate(target[: args.max_rows])]
    con.table(f"top {args.top} source tokens each target token attends to (cross-attention, mean of heads)",
              ("target token", *(f"layer {layer}" for layer in cross.layers)), rows)
    if args.out:
        with con.progress() as progress:
            path = report.write_report(maps, args.out, title=f"{args.text} → {args.target}", progress=progress)
        con.print(f"wrote {path} ({size(path.stat().st_size)}): cross-attention, encoder and decoder; "
                  "open it in a browser; it needs no network")
    if args.png:
        from attnkit.viz.png import save_alignment_png

        Path(args.png).mkdir(parents=True, exist_ok=True)
        con.print(f"wrote {save_alignment_png(maps, Path(args.png) / 'alignment.png')}")
    return 0


def _generate(args: argparse.Namespace, con: Console, model: nn.Module, tokenizer: Any) -> int:
    """``explain PROMPT --generate N``: greedy generation, and where each new token looked."""
    from attnkit.inspect import capture_generation
    from attnkit.viz import report

    kind = facts.kind(model)
    if kind == "encoder":
        raise UsageError(f"--generate needs a model that generates (a decoder such as GPT-2, or an encoder-decoder); "
                         f"{args.model!r} is an encoder-only model")
    if args.png:
        raise UsageError("--png does not go with --generate (the report shows the generation)")
    prompt = tokenizer(args.text, return_tensors="pt")
    with con.status(f"generating {args.generate} tokens..."):
        gen = capture_generation(model, dict(prompt), tokenizer, max_new_tokens=args.generate, do_sample=False)
    new = gen.sequences.shape[1] - (1 if kind == "encoder-decoder" else prompt["input_ids"].shape[1])
    tokens = list(gen.decoder.tokens[0])  # every token of the sequence, the last one included
    first = len(tokens) - new
    con.rule(f"{gen.decoder.model_name}: {first} prompt tokens + {new} generated, greedy")
    con.print(tokenizer.decode(gen.sequences[0], skip_special_tokens=True))
    last = len(gen.decoder.layers) - 1
    rows = []
    for p in range(first, min(len(tokens), first + args.max_rows)):
        row = gen.decoder.attentions[0][last, :, p - 1, :p].float().mean(0)
        looks = [_top(row, tokens[:p], args.top)]
        if gen.cross is not None:
            looks.append(_top(gen.cross.attentions[0][last, :, p - 1].float().mean(0), gen.cross.keys[0], args.top))
        rows.append((f"{p} {tokens[p]}", *looks))
    con.table(f"where each generated token looked (layer {gen.decoder.layers[last]}, mean of heads)",
              ("generated", "earlier tokens", *(["source"] if gen.cross is not None else [])), rows)
    if args.out:
        path = report.write_report(gen, args.out, new_tokens=new, tokenizer=tokenizer, title=args.text)
        con.print(f"wrote {path} ({size(path.stat().st_size)}): step through the generation; "
                  "open it in a browser; it needs no network")
    return 0
