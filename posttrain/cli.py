"""posttrain's command line: subcommand -> config dataclass -> recipe main(cfg).

    posttrain sft | rm | dpo | cpo | orpo | kto | ppo | grpo | rloo | online_dpo | distill  [--config FILE.yaml] [--FIELD VALUE ...]
    posttrain reward ...                   (the same as posttrain rm, TRL's name)
    posttrain gkd | distillation ...       (the same as posttrain distill, TRL's names)
    posttrain generate --model_name_or_path DIR --prompt TEXT
    posttrain eval     --model_name_or_path DIR --dataset_name FILE
    posttrain data     arith --output_dir DIR
    posttrain demo     [--output_dir runs/demo] [--quick] [--num_threads N]
    posttrain report   RUN_DIR [RUN_DIR ...] [--output FILE.html]

Exit codes: 0 success, 2 bad input (one line naming file, line and field),
1 any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys

# OpenMP's default busy-wait makes torch threads spin against each other (and
# any other process) on small CPUs; measured ~20x slower DPO steps on 2 cores.
# It must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from posttrain.errors import UserError  # noqa: E402

STAGES = ("sft", "rm", "dpo", "cpo", "orpo", "kto", "ppo", "grpo", "rloo", "online_dpo", "distill")
STAGE_HELP = {
    "sft": "supervised fine-tuning on prompt/completion or chat data",
    "rm": "train a Bradley-Terry reward model on preference pairs",
    "dpo": "Direct Preference Optimization (and IPO, hinge) on preference pairs",
    "ppo": "PPO-based RLHF: actor, critic, reference and reward sources",
    "grpo": "Group Relative Policy Optimization with verifiable rewards",
    "rloo": "REINFORCE Leave-One-Out: the grpo recipe with TRL RLOOTrainer's defaults (KL in the reward)",
    "online_dpo": "Online DPO: pairs sampled from the current policy, judged by the reward sources, DPO loss",
    "distill": "on-policy distillation and GKD from a frozen teacher (generalised JSD on student or dataset completions)",
    "cpo": "Contrastive Preference Optimization, and SimPO (--loss_type simpo): reference-free preference losses",
    "orpo": "Odds Ratio Preference Optimization: the chosen responses' NLL plus an odds-ratio term, reference-free",
}
STAGE_HELP["kto"] = "Kahneman-Tversky Optimization on rows labelled desirable / undesirable (or unpaired preference pairs)"
# TRL's command names of a posttrain stage -> the stage
STAGE_ALIASES = {"reward": "rm", "gkd": "distill", "distillation": "distill"}


# TRL's trainers (and commands) posttrain has no stage for -> what to run instead
_GRPO_ONLINE = "posttrain online_dpo, posttrain grpo or posttrain ppo with --reward_model_name_or_path (online, on sampled completions)"
NEAREST_STAGE = {
    "bco": "posttrain dpo on chosen / rejected pairs (BCO's unpaired labels are not read)",
    "xpo": _GRPO_ONLINE, "nash_md": _GRPO_ONLINE,
    "simpo": "posttrain cpo --loss_type simpo --cpo_alpha 0 (SimPO is CPO's loss_type simpo, as in TRL)",
    "prm": "posttrain rm (one reward per sequence; no per-step rewards)",
    "dapo": "posttrain grpo --loss_type dapo", "dr_grpo": "posttrain grpo --loss_type dr_grpo --scale_rewards none",
    "bnpo": "posttrain grpo --loss_type bnpo", "gspo": "posttrain grpo --importance_sampling_level sequence",
    "vllm_serve": "--rollout_engine module:factory of ppo / grpo (posttrain samples with transformers generate; a factory "
                  "plugs in a server)",
}


def _unknown_command(name: str, commands) -> str:
    """The line for a command posttrain does not have: the nearest stage for a TRL trainer's name, else the closest command."""
    import difflib

    stages = ", ".join("rm (reward)" if stage == "rm" else stage for stage in STAGES)
    listing = f"posttrain's stages: {stages}; other commands: generate, eval, data, demo, report"
    key = name.lower().replace("-", "_")
    if key in NEAREST_STAGE:
        return f"posttrain has no {name} stage; nearest: {NEAREST_STAGE[key]}. {listing}"
    match = difflib.get_close_matches(name, list(commands), n=1)
    return f"posttrain has no {name!r} command" + (f"; did you mean posttrain {match[0]}?" if match else ".") + f" {listing}"


class Parser(argparse.ArgumentParser):
    """argparse with prefix abbreviations off (`--learning` is not `--learning_rate`) and every
    error a UserError: one line on stderr, exit 2 (``--help`` still prints and exits 0)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False  # subparsers are made by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {' '.join(message.split())}")


def _unknown_args(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> str:
    """The message for arguments no parser took: the first unknown flag, with the closest valid one."""
    import difflib

    flags = [e for e in extras if e.startswith("-") and e.lstrip("-") and not _is_number(e)]
    if not flags:
        return f"posttrain {command}: unexpected argument {extras[0]!r}"
    name = flags[0].lstrip("-").split("=", 1)[0]
    if command in STAGES:
        from posttrain.config import unknown_field_message

        return unknown_field_message(command, name, also=("config",))
    options = [o for o in parser.commands[command]._option_string_actions if o.startswith("--")]
    match = difflib.get_close_matches(f"--{name}", options, n=1)
    hint = f"; did you mean {match[0]}?" if match else f" (see posttrain {command} --help)"
    return f"{flags[0].split('=', 1)[0]}: unknown option for posttrain {command}{hint}"


def _launch_options() -> tuple:
    from posttrain.config import ACCELERATE_LAUNCH_OPTIONS

    return ACCELERATE_LAUNCH_OPTIONS


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _field_docs(stage: str) -> dict[str, str]:
    """The --help text of a stage's fields (read from the source once per process: it is the slow part of the parser)."""
    from posttrain.config import STAGE_CONFIGS, field_docs

    return field_docs(STAGE_CONFIGS[stage])


def _stage_parser(sub, stage: str) -> None:
    from posttrain.config import STAGE_CONFIGS, TRL_UNSUPPORTED, trl_flags

    cls = STAGE_CONFIGS[stage]
    docs = _field_docs(stage)
    aliases: dict[str, list[str]] = {}
    for name, target in trl_flags(stage).items():
        aliases.setdefault(target, []).append(name)
    parser = sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage],
                            aliases=[alias for alias, target in STAGE_ALIASES.items() if target == stage])
    parser.add_argument("--config", help="YAML file of field: value (flags override it)")
    bools = set()
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # a boolean flag also works bare, as in TRL and the HF Trainer: `--bf16` means `--bf16 true`
        nargs = {"nargs": "?", "const": "true"} if f.type == "bool" else {}
        # a list takes TRL's space-separated values (`--reward_funcs a b`) as well as `a,b` (joined in _split_stage_args)
        nargs = {"nargs": "+"} if f.type == "list" or f.name in LIST_STRINGS else nargs
        bools.update([f.name] if f.type == "bool" else [])
        also = f" (TRL: {', '.join('--' + a for a in aliases[f.name])})" if f.name in aliases else ""
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=f.type.upper().split(" ")[0],
                            help=f"{docs.get(f.name, '')} (default: {default!r}){also}", **nargs)
    # TRL's names (README, TRL command lines): aliases, and flags posttrain refuses or ignores with a notice;
    # config.load_config reads them, so their values are taken here whatever they are
    for name in trl_flags(stage):
        if name not in bools:
            parser.add_argument(f"--{name}", default=argparse.SUPPRESS, nargs="?", const="true", help=argparse.SUPPRESS)
    # HfArgumentParser's negations: `--no_gradient_checkpointing` is `--gradient_checkpointing false`
    negatable = bools | {name for name, target in trl_flags(stage).items() if target in bools or name in TRL_UNSUPPORTED
                         and (TRL_UNSUPPORTED[name][0] is None or any(isinstance(v, bool) for v in TRL_UNSUPPORTED[name][0]))}
    for name in sorted(negatable):
        if not name.startswith("no_"):
            parser.add_argument(f"--no_{name}", dest=name, action="store_const", const="false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="posttrain", description="Post-training for causal language models.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # command -> its parser (for the unknown-flag message)
    for stage in STAGES:
        _stage_parser(sub, stage)

    gen = sub.add_parser("generate", help="sample completions from a model",
                         description="Sample completions from a local model folder and print one JSON line per "
                                     "completion. Sampling uses only these flags, never the folder's generation_config.json.")
    gen.add_argument("--model_name_or_path", required=True, help="local model folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="most new tokens per completion")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--num_return_sequences", type=int, default=1, help="completions per prompt")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")

    ev = sub.add_parser("eval", help="exact-match accuracy, mean reward and KL to a reference",
                        description="Evaluate a model on a prompt file: accuracy of completions sampled at "
                                    "temperature 1 and of greedy ones, mean reward, and the mean per-sequence KL "
                                    "to a reference model. Prints JSON.")
    ev.add_argument("--model_name_or_path", required=True, help="local model folder")
    ev.add_argument("--dataset_name", required=True, help="prompt file with `answer` fields")
    ev.add_argument("--ref_model_name_or_path", default="", help="reference model for the KL (optional)")
    ev.add_argument("--reward", default="exact_match", help="comma-separated reward functions")
    ev.add_argument("--max_new_tokens", type=int, default=16, help="most new tokens per completion")
    ev.add_argument("--batch_size", type=int, default=256, help="prompts per generate call")
    ev.add_argument("--max_rows", type=int, default=0, help="evaluate only the first N rows (0: all)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--output", default="", help="also write the results as JSON here")

    data = sub.add_parser("data", help="write a built-in synthetic task's datasets",
                          description="Write a built-in synthetic task's datasets (sft, preference, prompts, eval "
                                      ".jsonl), deterministic in --seed.")
    data.add_argument("task", choices=["arith"], help="the task")
    data.add_argument("--output_dir", required=True, help="folder for the .jsonl files")
    data.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    data.add_argument("--carry_error_rate", type=float, default=0.6,
                      help="fraction of carry demonstrations that drop the carry (the flaw SFT learns)")

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded tiny model, with a report",
                          description="Run data -> sft -> rm -> dpo / ppo / grpo -> eval -> report on the embedded tiny "
                                      "model and write report.json and report.html into --output_dir.")
    demo.add_argument("--output_dir", default="runs/demo", help="where each stage and the report go")
    demo.add_argument("--quick", action="store_true", help="shrink everything (for tests)")
    demo.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    demo.add_argument("--jobs", type=int, default=0, help="stages run side by side after SFT, one thread each (0: one per core, at most 4)")
    demo.add_argument("--num_threads", type=int, default=0,
                      help="torch threads of each stage and of the evaluation (0: SFT 2, the others 1, the evaluation one per core)")

    rep = sub.add_parser("report", help="draw report.html for one or more runs",
                         description="Draw report.html (and report.json) from one demo folder or several stage "
                                     "output folders.")
    rep.add_argument("runs", nargs="+", help="run folders (a demo folder, or stage output_dirs)")
    rep.add_argument("--output", default="", help="HTML file (default: report.html in the first run)")
    return parser


# str fields holding comma-separated names, which TRL's command line takes as a list (`--lora_target_modules q_proj v_proj`)
LIST_STRINGS = ("lora_target_modules",)


def _split_stage_args(args: argparse.Namespace) -> tuple[str | None, dict]:
    """(--config file, field -> flag value); the values of a list flag are joined as `a,b`, the form
    config.coerce reads for list fields and LIST_STRINGS alike."""
    values = {k: ",".join(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    values.pop("command")
    return values.pop("config", None), values


def run(argv: list[str]) -> int:
    parser = build_parser()
    first = argv[0] if argv else ""
    if first.startswith("--") and first[2:].split("=", 1)[0] in _launch_options():  # `posttrain --num_processes 8 grpo`
        from posttrain.config import launcher_message

        stage = next((a for a in argv if a in STAGES), "STAGE")
        raise UserError(launcher_message(stage, first.split("=", 1)[0]))
    if first and not first.startswith("-") and first not in parser.commands:  # argparse: "invalid choice", nothing suggested
        raise UserError(_unknown_command(first, parser.commands))
    args, extras = parser.parse_known_args(argv)
    args.command = STAGE_ALIASES.get(args.command, args.command)  # TRL's names: reward (rm), gkd / distillation
    if extras:
        raise UserError(_unknown_args(parser, args.command, extras))
    if args.command in STAGES:
        from posttrain.config import load_config, trl_default_notice

        config_file, overrides = _split_stage_args(args)
        # every value, file and folder is checked before torch is imported or anything is written
        given: dict = {}
        cfg = load_config(args.command, config_file, overrides, check_paths=True, given=given)
        # not a field (never saved): training.start_output prints it once the run starts, so that a run refused
        # for bad input still says one line
        cfg.trl_default_notice = trl_default_notice(args.command, cfg, given)
        from posttrain import distributed

        recipe = importlib.import_module(f"posttrain.recipes.{args.command}")
        with distributed.process_group():  # torchrun: one group for the whole run, destroyed also on error
            recipe.main(cfg)
    elif args.command == "generate":
        from posttrain.evaluation import generate_main

        generate_main(args)
    elif args.command == "eval":
        from posttrain.evaluation import eval_main

        eval_main(args)
    elif args.command == "data":
        from posttrain.tasks import arith

        arith.write_datasets(args.output_dir, seed=args.seed, carry_error_rate=args.carry_error_rate)
        print(f"wrote the arith datasets to {args.output_dir}")
    elif args.command == "demo":
        from posttrain.demo import run_demo

        run_demo(args.output_dir, quick=args.quick, stages=args.stages, jobs=args.jobs, num_threads=args.num_threads)
    elif args.command == "report":
        from posttrain.report import report_main

        report_main(args.runs, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever the input held
        print(f"posttrain: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the training loop's own stops: one line, no traceback
        from posttrain.training import Interrupted, TrainingStopped

        if isinstance(err, Interrupted):
            print(f"posttrain: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, TrainingStopped):
            print(f"posttrain: error: {err}", file=sys.stderr)
            return 1
        raise
