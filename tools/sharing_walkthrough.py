"""Walkthrough: one team dumps and publishes a cache on S3, another finds out what it holds, pulls part
of it and trains a student from it — printed as the commands a user types and what they answer.

The S3 server is moto's (the S3 HTTP API on 127.0.0.1, started here); everything else is the real
`kdcache` CLI in its own processes, reaching the server through the standard AWS environment
variables, as it would reach AWS. The teacher is a small random Llama over a generated language, so
the walkthrough runs on a CPU in about a minute; its numbers say nothing about distillation quality.

    python tools/sharing_walkthrough.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import torch
from moto.server import ThreadedMotoServer
from transformers import AutoModelForCausalLM, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdcache.demo.synthetic import SyntheticLanguage, build_word_tokenizer  # noqa: E402, RUF100


def start_s3() -> dict[str, str]:
    """A local S3 endpoint with a bucket; returns the environment that points the AWS SDKs at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    environment = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "team-a",
                   "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=environment["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                 aws_access_key_id="team-a", aws_secret_access_key="secret").create_bucket(Bucket="kd-caches")
    return environment


def make_teacher_and_data(workdir: Path) -> tuple[Path, Path, Path]:
    language = SyntheticLanguage(num_words=120, num_topics=3, branching=8, seed=3)
    tokenizer = build_word_tokenizer(language.words)
    config = {"vocab_size": len(tokenizer), "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 128}
    teacher = workdir / "teacher"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 **config)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n"
                              for text in language.sentences(400, min_words=8, max_words=24, seed=1)))
    student = workdir / "student.json"
    student.write_text(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, **config).to_json_string())
    return teacher, corpus, student


def run(workdir: Path, environment: dict[str, str], *args: str) -> None:
    """Run one kdcache command as a user would and print it with what it answers (progress bars, on
    stderr, are left out; a failure prints them with its error)."""
    print(f"$ kdcache {' '.join(shlex.quote(arg.replace(str(workdir), '.')) for arg in args)}")
    result = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, check=False,
                            cwd=workdir, env={**os.environ, **environment, "PYTHONPATH": str(REPO),
                                              "OMP_NUM_THREADS": "1"})
    print(result.stdout.replace(str(workdir), ".").rstrip() + "\n")
    if result.returncode != 0:
        raise SystemExit(f"the command failed ({result.returncode}):\n{result.stderr}")


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    return parser


def main() -> None:
    arguments = command_line().parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = (arguments.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        environment = start_s3()
        teacher, corpus, student = make_teacher_and_data(workdir)
        url = "s3://kd-caches/team-a/tiny-llama-top16"
        print("# team A: dump the teacher once, publish the cache")
        run(workdir, environment, "dump-teacher", "--teacher", str(teacher), "--data", str(corpus), "--out",
            str(workdir / "cache"), "--top-k", "16", "--shard-rows", "100", "--max-length", "32")
        run(workdir, environment, "copy", str(workdir / "cache"), url)
        print("# the same command again (e.g. after an interrupted upload) moves only what is missing")
        run(workdir, environment, "copy", str(workdir / "cache"), url)
        print("# team B: what is in it? (reads the manifest and card only)")
        run(workdir, environment, "info", url)
        print("# team B: fetch the first 150 sequences (a valid cache of its own), check it, train from it")
        run(workdir, environment, "copy", url, str(workdir / "subset"), "--rows", "150")
        run(workdir, environment, "verify", str(workdir / "subset"))
        run(workdir, environment, "train-student", "--cache", str(workdir / "subset"), "--student-config",
            str(student), "--out", str(workdir / "student"), "--max-steps", "20", "--batch-size", "8")
        print("# or train straight from the bucket, streaming the shards")
        run(workdir, environment, "train-student", "--cache", url, "--student-config", str(student), "--out",
            str(workdir / "student-s3"), "--max-steps", "20", "--batch-size", "8")


if __name__ == "__main__":
    main()
