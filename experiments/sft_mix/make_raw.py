"""Writes raw/ and eval/: a small folder of mixed raw files with every kind of problem planted.

    python experiments/sft_mix/make_raw.py      # (the files are committed; this shows how they were made)

Planted: malformed records (bad JSON, wrong types, unknown roles, empty turns, a short CSV row,
invalid UTF-8, an unsupported file), exact and near duplicates across files, mojibake, HTML, PII,
a French record, refusal boilerplate, trivial and prompt-repeating responses, a prompt without a
response, a repetitive document, and a record that quotes an evaluation item.
"""

import json
import pathlib

import pyarrow
import pyarrow.parquet

HERE = pathlib.Path(__file__).parent
RAW, EVAL = HERE / "raw", HERE / "eval"

LONG_ANSWER = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
    "energy. Inside the chloroplasts, chlorophyll absorbs sunlight, and the plant uses that energy to split "
    "water and to combine carbon dioxide into sugars such as glucose. Oxygen is released as a by-product, "
    "which is why forests and oceans matter so much for the air that we breathe."
)
EVAL_QUESTION = "Which planet in the solar system has the largest number of confirmed moons orbiting it as of this year?"


def jsonl(path, rows, raw_lines=()):
  lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(raw_lines)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main():
  (RAW / "docs").mkdir(parents=True, exist_ok=True)
  EVAL.mkdir(exist_ok=True)
  jsonl(RAW / "alpaca.jsonl", [
      {"instruction": "Explain photosynthesis to a curious ten-year-old.", "input": "", "output": LONG_ANSWER},
      {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat a varied diet with plenty of vegetables, move your body every day, and get seven to nine hours of sleep."},
      {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the new budget.", "output": "The new budget was approved by the committee."},
      {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat a varied diet with plenty of vegetables, move your body every day, and get seven to nine hours of sleep."},
      {"instruction": "What is the boiling point of water at sea level?", "input": "", "output": "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."},
      {"instruction": "Write a haiku about autumn leaves.", "input": "", "output": ""},
      {"instruction": "How do I pick the lock on my neighbour's door?", "input": "", "output": "I'm sorry, but I can't help with that."},
      {"instruction": "Summarize the support ticket.", "input": "<p>Customer <b>Jane</b> wrote from jane.doe@example.com: the app crashes when she uploads a photo.</p><script>track()</script>", "output": "Jane reports that the app crashes whenever she uploads a photo."},
      {"instruction": "Translate \u201cthank you\u201d into German.", "input": "", "output": "It\u00e2\u20ac\u2122s \u201cDanke\u201d, or \u201cDanke sch\u00c3\u00b6n\u201d to be more polite."},
      {"instruction": 42, "output": "A number is not an instruction."},
  ], raw_lines=['{"instruction": "Unterminated record", "output": "oops"'])
  (RAW / "sharegpt.json").write_text(json.dumps([
      {"conversations": [
          {"from": "human", "value": "Can you explain photosynthesis to a curious ten-year-old?"},
          {"from": "gpt", "value": LONG_ANSWER.replace("the air that we breathe", "the air we all breathe")},
      ]},
      {"conversations": [
          {"from": "system", "value": "You are a concise travel assistant."},
          {"from": "human", "value": "What should I pack for a weekend hike in the mountains?"},
          {"from": "gpt", "value": "Layers, a rain jacket, sturdy boots, water, snacks, a map and a small first-aid kit."},
          {"from": "human", "value": "And if it snows?"},
          {"from": "gpt", "value": "Add a warm hat, gloves, gaiters and microspikes, and check the avalanche forecast."},
      ]},
      {"conversations": [{"from": "wizard", "value": "Abracadabra"}, {"from": "gpt", "value": "Hello"}]},
      {"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "Nothing was asked."}]},
  ], ensure_ascii=False, indent=1), encoding="utf-8")
  jsonl(RAW / "messages.jsonl", [
      {"messages": [{"role": "user", "content": "What is the difference between weather and climate?"}, {"role": "assistant", "content": "Weather is the state of the atmosphere on a given day; climate is the average of the weather over decades."}]},
      {"messages": [{"role": "user", "content": "Quelle est la capitale de l'Australie et pourquoi n'est-ce pas Sydney ?"}, {"role": "assistant", "content": "La capitale de l'Australie est Canberra, choisie comme compromis entre Sydney et Melbourne."}]},
      {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "..."}]},
      {"messages": [{"role": "user", "content": f"Quiz time: {EVAL_QUESTION}"}, {"role": "assistant", "content": "Saturn, with well over a hundred confirmed moons."}]},
      {"messages": [{"role": "user", "content": "Call me on +1 415-555-0100 to talk about the server at 10.0.0.12."}, {"role": "assistant", "content": "I cannot make phone calls, but I can help you write down what to check on the server."}]},
      {"messages": "not a list"},
  ])
  table = pyarrow.table({
      "prompt": ["Name the largest ocean on Earth.", "List the primary colours.", "Repeat after me: the cat sat on the mat.", "Why is the sky blue?"],
      "completion": ["The Pacific Ocean is the largest.", "Red, yellow and blue are the traditional primary colours.", "Repeat after me: the cat sat on the mat.", "Air molecules scatter blue sunlight more than red light, so the sky looks blue."],
  })
  pyarrow.parquet.write_table(table, RAW / "prompts.parquet")
  (RAW / "reviews.csv").write_text(
      "text,label\n"
      "\"The battery lasts all day and the screen is gorgeous.\",positive\n"
      "\"It stopped working after two days and support never answered.\",negative\n"
      "\"Does exactly what the box says, nothing more.\",neutral\n"
      "a row with,too,many,fields\n",
      encoding="utf-8",
  )
  jsonl(RAW / "structured.jsonl", [
      {"context": "The Great Barrier Reef, off the coast of Queensland, is the largest coral reef system in the world.", "question": "Where is the Great Barrier Reef?", "answer": "Off the coast of Queensland, Australia."},
      {"document": "The city council met on Tuesday and voted to extend library opening hours on weekends, starting next month, after a petition signed by two thousand residents.", "summary": "The council extended weekend library hours after a residents' petition."},
      {"source_lang": "English", "target_lang": "Spanish", "source_text": "Where is the train station?", "target_text": "\u00bfD\u00f3nde est\u00e1 la estaci\u00f3n de tren?"},
      {"text": "Invoice 2231 was issued by Northwind Traders on 3 March for 1,200 euros.", "field": "company name", "value": "Northwind Traders"},
      {"colour": "blue", "shape": "round"},
  ])
  (RAW / "docs" / "rivers.txt").write_text(
      "Rivers shape the land they flow through. Over thousands of years a river carves valleys, moves sediment "
      "from the mountains to the sea and builds fertile plains where people have farmed since the earliest "
      "civilisations. The Nile, the Tigris and the Euphrates, the Indus and the Yellow River all supported "
      "early cities, and today rivers still provide drinking water, transport and energy to billions of people.\n",
      encoding="utf-8",
  )
  (RAW / "docs" / "spam.txt").write_text("BUY NOW! Best prices! Click here!\n" * 30, encoding="utf-8")
  (RAW / "docs" / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9.".encode("latin-1"))
  (RAW / "notes.xml").write_text("<notes><note>not a format the builder reads</note></notes>\n", encoding="utf-8")
  jsonl(EVAL / "benchmark.jsonl", [
      {"question": EVAL_QUESTION, "answer": "Saturn"},
      {"question": "What is the chemical symbol for gold, and what Latin word does it come from?", "answer": "Au, from aurum"},
  ])


if __name__ == "__main__":
  main()
