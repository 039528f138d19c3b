"""Talking to DiLaServe with the official OpenAI client.

Start a server first (`dilaserve serve --config examples/serve_cpu.yaml`), then:
    .venv/bin/python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
DiLaServe's own fields (threshold, block_length, deadline_ms, quality_floor, best_effort, ...)
travel in `extra_body`; its per-response report is the `dilaserve` field of each body.
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the server's http.api_key, if it has one")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model = client.models.list().data[0].id

    # The embedded model answers arithmetic word problems in LLaDA's chat format; completions
    # send raw text, so the prompt carries that format (the chat endpoint applies it for you).
    question = "Sam has 17 stamps. He gives away 8. He loses 2. How many stamps does Sam have now?"
    prompt = (f"<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    completion = client.completions.create(
        model=model, prompt=prompt, max_tokens=32,
        extra_body={"threshold": 0.9, "block_length": 32, "deadline_ms": 2000},
    )
    print("completion:", repr(completion.choices[0].text), completion.usage)
    print("served by:", completion.model_extra["dilaserve"]["replica"],
          "slo met:", completion.model_extra["dilaserve"]["slo_met"])

    print("chat stream: ", end="")
    for chunk in client.chat.completions.create(
        model=model, max_tokens=32, stream=True,
        messages=[{"role": "user", "content": "Leo has 5 shells. He finds 9 more. He loses 3. How many shells does Leo have now?"}],
    ):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    try:  # an impossible deadline is refused at once (HTTP 429 with Retry-After)...
        client.completions.create(model=model, prompt="1+1=", max_tokens=32, extra_body={"deadline_ms": 1})
    except openai.RateLimitError as exc:
        print("refused:", exc.response.headers.get("retry-after"), "s;", exc.body["message"][:80], "...")
    late = client.completions.create(  # ...unless the request accepts best effort
        model=model, prompt="1+1=", max_tokens=32, extra_body={"deadline_ms": 1, "best_effort": True},
    )
    print("best effort:", late.choices[0].finish_reason)


if __name__ == "__main__":
    main()
