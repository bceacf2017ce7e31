"""Client libraries we did not write, against a running `wallbreak serve` (the default bundle):
instructor (json_schema and tools modes, 20 calls each at temperature 0.7, a pydantic model with a
nested object and an enum), langchain-openai (with_structured_output in each method, bind_tools with
tool_choice="required", a two-turn tool loop), and the official openai client (n=3 with a seed,
streamed tool calls with model "coe", embeddings). Prints one JSON object.

    wallbreak serve --compile off --port 8011 &
    python benchmarks/client_referees.py [http://127.0.0.1:8011/v1]
"""

import json
import math
import statistics
import sys
import time
from enum import Enum

import instructor
import openai
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8011/v1"
EXPERT = "smollm2-135m-instruct"
c = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0)


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Owner(BaseModel):
    name: str
    age: int


class Car(BaseModel):
    make: str
    colour: Colour
    owner: Owner
    doors: int


out = {}
msgs = [
    {
        "role": "user",
        "content": "Describe a car: its make, colour, number of doors, and its owner's name and age.",
    }
]
for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
    ic = instructor.from_openai(c, mode=mode)
    ok, errs, times, samples = 0, [], [], []
    for _i in range(20):
        t0 = time.perf_counter()
        try:
            car = ic.chat.completions.create(
                model=EXPERT,
                response_model=Car,
                messages=msgs,
                temperature=0.7,
                max_tokens=200,
                max_retries=0,
            )
            ok += isinstance(car, Car)
            samples.append(car.model_dump(mode="json")) if len(samples) < 2 else None
        except Exception as e:
            errs.append(f"{type(e).__name__}: {str(e)[:200]}")
        times.append(time.perf_counter() - t0)
    out[f"instructor_{mode.value}"] = {
        "valid": ok,
        "of": 20,
        "errors": errs[:3],
        "median_s": round(statistics.median(times), 2),
        "samples": samples,
    }

llm = ChatOpenAI(model=EXPERT, base_url=URL, api_key="unused", max_tokens=200, max_retries=0, temperature=0.7)
lc = {}
for method in ("json_schema", "function_calling", "json_mode"):
    try:
        r = llm.with_structured_output(Car, method=method).invoke(
            "Describe a car as JSON with make, colour, doors, owner{name, age}."
        )
        lc[method] = {"ok": isinstance(r, Car), "value": r.model_dump(mode="json")}
    except Exception as e:
        lc[method] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
bound = llm.bind_tools([WEATHER], tool_choice="required")
first = bound.invoke([HumanMessage("What is the weather in Paris?")])
lc["bind_tools_required"] = {"tool_calls": first.tool_calls}
second = llm.bind_tools([WEATHER]).invoke(
    [
        HumanMessage("What is the weather in Paris?"),
        first,
        ToolMessage("Sunny, 24 C", tool_call_id=first.tool_calls[0]["id"]),
    ]
)
lc["second_turn"] = {"content": second.content, "tool_calls": second.tool_calls}
out["langchain"] = lc
fruit = {
    "model": EXPERT,
    "messages": [{"role": "user", "content": "Name a fruit."}],
    "n": 3,
    "seed": 7,
    "temperature": 0.8,
    "max_tokens": 12,
}
r, r2 = c.chat.completions.create(**fruit), c.chat.completions.create(**fruit)
out["openai_n3"] = [ch.message.content for ch in r.choices]
out["openai_n3_reproduced"] = [ch.message.content for ch in r2.choices] == out["openai_n3"]
for choice in ("required", "auto"):
    parts, fin, text = {}, None, ""
    for ch in c.chat.completions.create(
        model="coe",
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice=choice,
        stream=True,
        max_tokens=80,
        temperature=0,
    ):
        if not ch.choices:
            continue
        text += ch.choices[0].delta.content or ""
        for tc in ch.choices[0].delta.tool_calls or []:
            e = parts.setdefault(tc.index, {"name": "", "arguments": ""})
            e["name"] += tc.function.name or ""
            e["arguments"] += tc.function.arguments or ""
        fin = ch.choices[0].finish_reason or fin
        model = ch.model
    out[f"openai_stream_tool_call_{choice}_coe"] = {
        "expert": model,
        "calls": parts,
        "content": text,
        "finish": fin,
    }
emb_model = next(m.id for m in c.models.list() if getattr(m, "kind", None) == "embedding" or "MiniLM" in m.id)
e = c.embeddings.create(model=emb_model, input=["the weather in Oslo", "a haiku about disks"])

out["openai_embeddings"] = {
    "model": emb_model,
    "dims": [len(d.embedding) for d in e.data],
    "norms": [round(math.sqrt(sum(x * x for x in d.embedding)), 4) for d in e.data],
    "usage": e.usage.model_dump(),
}
print(json.dumps(out, indent=1, ensure_ascii=False))
