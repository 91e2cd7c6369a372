"""``tunesmith eval``: perplexity and generation metrics of a model, optionally with an adapter, on a dataset,
and lm-evaluation-harness tasks run with the same model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from tunesmith.models import DEFAULT_MODEL
from tunesmith.records import PRECISION_NAMES


@click.command("eval")
@click.option(
    "--model",
    default=None,
    show_default=f"{DEFAULT_MODEL}; with --adapter, the base recorded in the run's config.yaml, or else in adapter_config.json",
    help="Local Hugging Face model folder (a merged export works too), or the built-in alias smollm2-135m.",
)
@click.option("--adapter", default=None, show_default="none", help="peft adapter folder to apply (OUTPUT/final or OUTPUT/checkpoint-N).")
@click.option(
    "--dataset", default=None, type=click.Path(path_type=Path),
    help="Rows to evaluate on with --metric. perplexity: any sft/pt format; the others: 'messages' (ending in a user turn or the "
    "reference reply) or 'prompt', with an 'answer' or 'reference' column where the reply is not in the row.",
)
@click.option(
    "--metric", "metrics", multiple=True,
    help="Repeatable: perplexity, exact_match, bleu, rouge, or reward:NAME (NAME as --reward takes it: "
    "a registered reward, module:function or rm:PATH).",
)
@click.option(
    "--lm-eval-tasks", default=None, show_default="none",
    help="lm-evaluation-harness tasks to run with the model, comma-separated names or glob patterns "
    "(pip install 'tunesmith[lm-eval]'). Generation follows each task's generation_kwargs.",
)
@click.option(
    "--lm-eval-include", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Repeatable: a folder of lm-eval task YAML files for --lm-eval-tasks, searched before lm-eval's built-in tasks.",
)
@click.option("--output", default=None, type=click.Path(path_type=Path), show_default="none: print only", help="JSON file to write the results to.")
@click.option(
    "--predictions", default=None, type=click.Path(path_type=Path), show_default="none: replies kept in memory",
    help="JSON Lines file to write each row with its reply (as 'response') to, as 'infer --file' does: "
    "running the command again resumes it and regenerates nothing already there.",
)
@click.option("--batch-size", default=8, type=click.IntRange(min=1), help="Rows in one forward pass or one generation batch.")
@click.option(
    "--max-new-tokens", default=256, type=click.IntRange(min=1), help="Most tokens to generate per reply (lm-eval: where a task's generation_kwargs give no max_gen_toks)."
)
@click.option("--temperature", default=0.0, type=click.FloatRange(min=0.0), help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, type=click.FloatRange(min=0.0, max=1.0, min_open=True), help="Nucleus sampling; 1.0 is off.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Sample among the k likeliest tokens; 0 is off.")
@click.option("--repetition-penalty", default=1.0, type=click.FloatRange(min=0.0, min_open=True), help="Penalty on repeated tokens; 1.0 is off.")
@click.option(
    "--seed", default=None, type=int, show_default="unseeded",
    help="Seed for sampling; each row's reply is then reproducible whatever --batch-size.",
)
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True, help="Allow the model folder's own Python code to run.")
@click.option("--device", default="auto", help="Device to run on: a registered device name (tunesmith env lists them), or auto.")
@click.option(
    "--precision", default="auto", type=click.Choice(["auto", *PRECISION_NAMES]),
    help="Weights and compute in this precision; auto picks the device's fastest native one.",
)
def eval_command(
    model, adapter, dataset, metrics, lm_eval_tasks, lm_eval_include, output, predictions, batch_size, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, trust_remote_code,
    device, precision,
):
    """Evaluate a model on a dataset: perplexity, or metrics of its replies against references or by reward functions;
    and on lm-evaluation-harness tasks.

    Perplexity is token-weighted over the file: assistant tokens of conversations, every token
    of plain text. Replies are generated once, in batches, for all the generation metrics.
    """
    from tunesmith import evaluation, models
    from tunesmith.adapters import adapter_folder, base_model
    from tunesmith.generation import GenerationOptions
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.rewards import load_rewards
    from tunesmith.runtime import select_runtime

    tasks = _check_what_to_evaluate(dataset, metrics, lm_eval_tasks, lm_eval_include)
    evaluation.check_metrics(metrics)
    evaluation.check_libraries(metrics)
    if predictions is not None and not evaluation.needs_generation(metrics):
        raise click.UsageError("--predictions holds generated replies, and perplexity generates none; give a metric of replies too, or leave it out")
    options = GenerationOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
    )
    manager = create_plugin_manager()
    runtime = select_runtime(manager, device, precision)
    reward_metrics = [metric for metric in metrics if metric.startswith(evaluation.REWARD_PREFIX)]
    rewards = load_rewards([metric[len(evaluation.REWARD_PREFIX):] for metric in reward_metrics], manager, runtime=runtime)
    adapter_path = adapter_folder(adapter, if_full_model="pass it as --model instead") if adapter is not None else None
    model_name = base_model(model, adapter_path)
    if model is None and adapter_path is not None:
        click.echo(f"base model: {model_name}", err=True)
    click.echo(runtime.describe(), err=True)
    rows = _generation_rows(dataset, metrics, rewards) if evaluation.needs_generation(metrics) else []
    if tasks:
        from tunesmith.lm_eval import TunesmithLM, find_tasks, run_tasks

        task_manager, task_names = find_tasks(tasks, list(lm_eval_include))
    loaded, tokenizer = models.load_for_inference(model_name, runtime, adapter_path, trust_remote_code)

    results: dict = {}
    if evaluation.PERPLEXITY in metrics:
        results[evaluation.PERPLEXITY] = evaluation.perplexity(loaded, tokenizer, dataset, batch_size)
    if rows:
        replies = _generate(loaded, tokenizer, rows, options, batch_size, predictions)
        for metric in metrics:
            if metric in evaluation.REFERENCE_METRICS:
                references = [evaluation.reference(row, metric) for row in rows]
                results[metric] = evaluation.REFERENCE_METRIC_FUNCTIONS[metric](replies, references)
        if rewards:
            from tunesmith.rewards import RewardRunner

            prompts, completions, columns = evaluation.reward_inputs(rows, replies)
            scored = RewardRunner(rewards, timeout=None)(prompts, completions, columns, [row.where for row in rows])
            for metric, reward in zip(reward_metrics, rewards):
                results[metric] = evaluation.reward_metric(scored.values[reward.name])
    summary = {
        "model": model_name,
        "adapter": str(adapter_path) if adapter_path is not None else None,
        "dataset": str(dataset) if dataset is not None else None,
        "generation": dataclasses.asdict(options),
        "metrics": {metric: results[metric] for metric in metrics},
    }
    if tasks:
        harness = TunesmithLM(loaded, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
        summary["lm_eval"] = {"tasks": task_names, **run_tasks(harness, task_manager, task_names)}
    _print_table(summary["metrics"], summary.get("lm_eval", {}).get("results", {}))
    if output is not None:
        evaluation.write_results(output, summary)
        click.echo(f"results written to {output}")


def _check_what_to_evaluate(dataset: Path | None, metrics, lm_eval_tasks: str | None, lm_eval_include) -> list[str]:
    """Refuse options that leave nothing to evaluate or that miss their partner; the lm-eval task names."""
    tasks = [task.strip() for task in (lm_eval_tasks or "").split(",") if task.strip()]
    if not metrics and not tasks:
        raise click.UsageError("nothing to evaluate: give --dataset with --metric, --lm-eval-tasks, or both")
    if metrics and dataset is None:
        raise click.UsageError("--metric needs --dataset: the rows to evaluate on")
    if dataset is not None and not metrics:
        raise click.UsageError("--dataset is evaluated with --metric: give at least one (perplexity, exact_match, ...)")
    if lm_eval_include and not tasks:
        raise click.UsageError("--lm-eval-include holds task files for --lm-eval-tasks: give the tasks to run")
    return tasks


def _generation_rows(dataset: Path, metrics, rewards):
    """The prompt rows, with every reference and reward column checked before the model loads."""
    from tunesmith import evaluation
    from tunesmith.batch_inference import read_prompt_rows
    from tunesmith.errors import DataError
    from tunesmith.rewards import check_reward_columns

    rows = read_prompt_rows(dataset, formats=evaluation.EVAL_ROW_FORMATS)
    if not rows:
        raise DataError(f"{dataset}: no rows to generate replies for")
    for metric in metrics:
        if metric in evaluation.REFERENCE_METRICS:
            for row in rows:
                evaluation.reference(row, metric)
    check_reward_columns(rewards, {name for row in rows for name in row.columns}, str(dataset))
    return rows


def _generate(model, tokenizer, rows, options, batch_size: int, predictions: Path | None) -> list[str]:
    """Every row's reply: generated in memory, or into (and then read back from) ``predictions``."""
    import json

    from tunesmith.batch_inference import REPLY_FIELD, generate_replies, write_replies
    from tunesmith.commands.infer import reply_progress

    with reply_progress() as progress:
        if predictions is not None:
            write_replies(model, tokenizer, rows, predictions, options, batch_size, on_progress=progress)
            with predictions.open(encoding="utf-8") as lines:
                return [json.loads(line)[REPLY_FIELD] for line in lines]
        replies: list[str] = []
        for batch in generate_replies(model, tokenizer, [row.messages for row in rows], options, batch_size):
            replies.extend(batch)
            progress(len(replies), len(rows))
        return replies


def _print_table(results: dict, lm_eval_results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tunesmith.evaluation import ROUGE_TYPES

    table = Table("metric", "value", "detail")
    for metric, values in results.items():
        if metric == "perplexity":
            detail = f"mean NLL {values['mean_nll']:.4f} over {values['tokens']} tokens, {values['rows']} rows"
            table.add_row(metric, f"{values['perplexity']:.4f}", detail)
        elif metric == "exact_match":
            table.add_row(metric, f"{values['score']:.4f}", f"{values['matches']} of {values['rows']} rows")
        elif metric == "bleu":
            table.add_row(metric, f"{values['score']:.2f}", f"sacrebleu corpus BLEU, {values['rows']} rows")
        elif metric == "rouge":
            for kind in ROUGE_TYPES:
                table.add_row(kind, f"{values[kind]:.4f}", f"mean F-measure, {values['rows']} rows")
        else:
            mean = "n/a" if values["mean"] is None else f"{values['mean']:.4f}"
            table.add_row(metric, mean, f"mean of {values['scored']} scored; {values['unscored']} unscored")
    for task, values in lm_eval_results.items():
        # lm-eval names each value "METRIC,FILTER", with its standard error as "METRIC_stderr,FILTER".
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            detail = "lm-eval" + (f", stderr {stderr:.4f}" if isinstance(stderr, float) else "") + ("" if filter_name == "none" else f", filter {filter_name}")
            table.add_row(f"{task} {metric}", f"{value:.4f}", detail)
    Console().print(table)
