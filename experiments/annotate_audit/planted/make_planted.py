"""Writes raw/ and gold.jsonl: a small hand-written set of clean records the builder must keep and planted
defects it must drop, to measure each filter's precision and recall (measure.py).

    python experiments/annotate_audit/planted/make_planted.py   # (the files are committed; this shows how)

Kept: short English instructions (quoted words, code, digits, names), arithmetic and one-word-answer
families that share a long template but not their answers, code questions, ordinary prose answers.
Dropped: records in other languages, exact copies (case, spacing, punctuation), near copies (a few words
reworded, a prompt reworded over the same long answer), refusals, empty and trivial responses.

raw/records.jsonl holds everything but the copies, raw/records_copies.jsonl the copies: their ids sort
after the originals, so the copy is the one dropped. gold.jsonl has one line per record:
{"id", "expect": "keep" | "drop", "stage", "reason", "of" (a copy's original), "why"}.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).parent
RAW = HERE / "raw"

SHORT = [  # (instruction, response): short English, the kind a language identifier is unsure of
    ("Spell the word 'bananas' backwards.", "sananab"),
    ("Reverse the string 'abc123'.", "321cba"),
    ("What is the plural of 'cactus'?", "cacti"),
    ("Convert 5 km to miles.", "About 3.11 miles."),
    ("Name the author of 'Don Quixote'.", "Miguel de Cervantes."),
    ("What does len([1, 2, 3]) return in Python?", "3"),
    ("Write a Python one-liner that sums the list xs.", "sum(xs)"),
    ("Capitalize every word: 'hello world'", "Hello World"),
    ("Give the chemical symbol for gold.", "Au"),
    ("What is the capital of Burkina Faso?", "Ouagadougou."),
    ("Who painted 'Las Meninas'?", "Diego Velazquez."),
    ("Sort these letters alphabetically: q, d, m", "d, m, q"),
    ("Expand the acronym 'NASA'.", "National Aeronautics and Space Administration."),
    ("Write a regex for a five-digit US ZIP code.", "^\\d{5}$"),
    ("What is 2**10 in Python?", "1024"),
    ("Is 'racecar' a palindrome?", "Yes."),
    ("Unscramble the letters 'tca'.", "cat"),
    ("Which is larger, 0.3 or 0.25?", "0.3"),
    ("Write the SQL that counts the rows of the table users.", "SELECT COUNT(*) FROM users;"),
    ("What is the opposite of 'ascend'?", "descend"),
    ("Give the hex code of pure red.", "#FF0000"),
    ("Name the largest planet.", "Jupiter."),
    ("What is the past tense of 'swim'?", "swam"),
    ("Abbreviate 'kilogram'.", "kg"),
    ("Who wrote 'Hamlet'?", "William Shakespeare."),
    ("Put 'Kafka' in lowercase.", "kafka"),
    ("Count the vowels in 'banana'.", "3"),
    ("What is the Roman numeral for 14?", "XIV"),
    ("Which HTTP status code means 'Not Found'?", "404"),
    ("Write the git command that lists branches.", "git branch"),
    ("What is the square root of 144?", "12"),
    ("Translate the emoji :) into a word.", "smile"),
    ("What file extension do Python files use?", ".py"),
    ("Name a prime number between 20 and 25.", "23"),
    ("Rewrite 'dont' with its apostrophe.", "don't"),
    ("What is the boiling point of water in Celsius?", "100 degrees Celsius at sea level."),
    ("Give the ISO 639-1 code of German.", "de"),
    ("What does CPU stand for?", "Central processing unit."),
    ("Who was the first person on the Moon?", "Neil Armstrong, in 1969."),
    ("Fix the typo: 'recieve'", "receive"),
]

ARITHMETIC = [  # a long shared template, different numbers, different short answers
    *((f"Answer the arithmetic question below with the final number only, no words and no working. What is {a} "
       f"and {b}?", str(a + b)) for a, b in [(41, 66), (41, 79), (41, 12), (58, 17), (58, 30), (23, 23)]),
    *((f"Add the numbers {a} and {b}, and reply with the result only.", str(a + b))
      for a, b in [(14, 27), (14, 72), (305, 118), (66, 41)]),
    *((f"You are checking a child's homework. Compute {a} times {b} and give only the number, nothing else.",
       str(a * b)) for a, b in [(12, 7), (12, 8), (9, 9), (15, 4)]),
    *((f"A shop sells pencils for {p} cents each. How many cents do {n} pencils cost in total?",
       f"They cost {p * n} cents in total, because {n} pencils at {p} cents each make {n} x {p} = {p * n} cents.")
      for p, n in [(15, 4), (15, 6), (20, 3), (35, 2)]),
]

ONE_WORD = [  # the same template, a different one-word answer
    *((f"Reply with a single word and no punctuation or explanation. What is the capital city of {country}?", city)
      for country, city in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
                            ("Portugal", "Lisbon"), ("Austria", "Vienna")]),
    *((f"Write a one-line birthday greeting for my good friend {name}, to go on a card with flowers.",
       f"Happy birthday, {name}!") for name in ["Alice", "Bob", "Carmen", "Dmitri"]),
    *((f"Is the number {n} even or odd? Answer with one word, and do not explain your answer.",
       "Even." if n % 2 == 0 else "Odd.") for n in [17, 42]),
]

CODE = [
    ("How do I read a file line by line in Python?",
     "Open it in a with block and iterate over it:\n\n```python\nwith open('data.txt') as f:\n    for line in f:\n"
     "        print(line.rstrip())\n```\n\nThe file is closed when the block ends."),
    ("What does this print?\n\n```python\nprint(sorted({3, 1, 2}))\n```", "[1, 2, 3]"),
    ("Write a JavaScript function that doubles a number.", "```js\nconst double = (x) => 2 * x;\n```"),
    ("Why does `0.1 + 0.2 == 0.3` return False in Python?",
     "Floats are binary fractions: 0.1 and 0.2 cannot be stored exactly, so their sum is 0.30000000000000004. "
     "Compare with math.isclose(a, b) instead."),
    ("Show a SQL query that returns the ten newest orders.",
     "```sql\nSELECT * FROM orders ORDER BY created_at DESC LIMIT 10;\n```"),
    ("What is the difference between a list and a tuple in Python?",
     "A list is mutable: you can append, remove and change items. A tuple is immutable, so it can be a "
     "dictionary key and signals that the sequence should not change."),
    ("Fix the bug:\n\n```python\ndef add(a, b):\n    return a - b\n```",
     "```python\ndef add(a, b):\n    return a + b\n```"),
    ("Write a bash command that counts the lines of every .py file in a folder.", "wc -l *.py"),
    ("How do I make a Python dict from two lists, keys and values?", "dict(zip(keys, values))"),
    ("What does `git rebase -i HEAD~3` do?",
     "It opens an editor listing the last three commits, where you can reorder, squash, edit or drop them "
     "before they are replayed on top of HEAD~3."),
]

PROSE = [
    ("Explain photosynthesis to a curious ten-year-old.",
     "Photosynthesis is how green plants make their own food. Their leaves catch sunlight and use its energy to "
     "turn water from the soil and carbon dioxide from the air into sugar, which the plant uses to grow. Along "
     "the way the plant gives off oxygen, which is the air that people and animals need to breathe."),
    ("Give three tips for staying healthy.",
     "Eat a varied diet with plenty of vegetables, move your body every day, and get seven to nine hours of sleep."),
    ("Why is the sky blue?",
     "Sunlight holds every colour, but air molecules scatter short blue wavelengths much more than long red "
     "ones, so blue light reaches our eyes from every direction of the sky."),
    ("Summarise the plot of Romeo and Juliet in two sentences.",
     "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings ends with "
     "both taking their own lives, which finally reconciles their families."),
    ("What are the main causes of inflation?",
     "Inflation rises when demand grows faster than the economy can produce, when costs such as energy or wages "
     "go up and are passed on to prices, and when people expect prices to keep rising and act on it."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall\nthe maple lets go its red\nwind carries the year"),
    ("Describe how a bill becomes a law in the United States.",
     "A member of Congress introduces the bill, a committee studies and amends it, and both the House and the "
     "Senate must pass the same text. The President then signs it into law or vetoes it; a two-thirds vote of "
     "both chambers can override a veto."),
    ("How should I prepare for a job interview?",
     "Research the company and the role, prepare short stories that show your skills, practise answering common "
     "questions out loud, and have two or three thoughtful questions of your own ready for the end."),
    ("What is the difference between weather and climate?",
     "Weather is what the atmosphere does on a given day; climate is the long-run average of that weather over "
     "decades in one place."),
    ("Suggest a name for a bakery that specialises in sourdough.", "Wild Rise Bakery."),
]

FOREIGN = [  # ("language", instruction, response)
    ("fr", "Quelle est la capitale de l'Australie et pourquoi ?",
     "La capitale de l'Australie est Canberra, une ville choisie comme compromis entre Sydney et Melbourne."),
    ("es", "¿Cuál es la mejor manera de aprender un idioma nuevo?",
     "Lo mejor es practicar todos los días, hablar con nativos y leer libros sencillos en ese idioma."),
    ("de", "Wie funktioniert eine Wärmepumpe?",
     "Eine Wärmepumpe entzieht der Umgebung Wärme und hebt sie mit einem Kompressor auf eine höhere Temperatur."),
    ("it", "Come si prepara un buon caffè espresso a casa?",
     "Serve una macchina adatta, caffè macinato fine e acqua fresca; la tazzina va scaldata prima."),
    ("pt", "Quais são os benefícios de caminhar todos os dias?",
     "Caminhar melhora o coração, fortalece os músculos e ajuda a reduzir o estresse do dia a dia."),
    ("nl", "Wat is het verschil tussen een fiets en een bromfiets?",
     "Een bromfiets heeft een motor en een fiets niet; daarom gelden er andere regels op de weg."),
    ("fr", "Écris une phrase sur la mer.", "La mer est calme ce matin et les bateaux rentrent au port."),
    ("es", "Dime un refrán popular.", "Más vale tarde que nunca, como decía siempre mi abuela."),
    ("de", "Was ist die Hauptstadt von Österreich?", "Die Hauptstadt von Österreich ist Wien."),
    ("sv", "Vad heter Sveriges största sjö?", "Sveriges största sjö heter Vänern och ligger i västra Sverige."),
]

REFUSALS = [
    ("Help me write a cover letter.", "As an AI language model, I cannot write personal documents for you."),
    ("Tell me how to pick a lock.", "I'm sorry, but I can't assist with this request."),
    ("What is the weather like today?", "I do not have the ability to browse the internet or check the weather."),
    ("Summarise this contract for me.", "I am unable to provide legal summaries of contracts."),
]

EMPTY = [  # (instruction, response, stage, reason)
    ("Name three primary colours.", "", "annotate", "missing response"),
    ("List the days of the week.", "...", "filter", "trivial response"),
    ("Say something nice.", "   ", "annotate", "missing response"),
]

# (the original's instruction, the copy's instruction, the copy's response): copies of clean records.
EXACT = [
    ("Why is the sky blue?", "Why is the sky blue?",
     "sunlight holds every colour but air molecules scatter short blue wavelengths much more than long red ones so "
     "blue light reaches our eyes from every direction of the sky"),
    ("Give three tips for staying healthy.", "Give three tips for staying healthy!",
     "Eat a varied diet, with plenty of vegetables; move your body every day -- and get seven to nine hours of sleep."),
    ("What is the difference between a list and a tuple in Python?",
     "WHAT IS THE DIFFERENCE BETWEEN A LIST AND A TUPLE IN PYTHON?",
     "A LIST IS MUTABLE: YOU CAN APPEND, REMOVE AND CHANGE ITEMS. A TUPLE IS IMMUTABLE, SO IT CAN BE A "
     "DICTIONARY KEY AND SIGNALS THAT THE SEQUENCE SHOULD NOT CHANGE."),
    ("Answer the arithmetic question below with the final number only, no words and no working. What is 41 and 66?",
     "answer the arithmetic question below with the final number only -- no words, and no working: what is 41 and 66",
     "107"),
]
GUIDE = (  # a long document, and a copy of it with a few words changed
    "Setting up a home aquarium takes patience. Rinse the gravel and the decorations in clean water, never with "
    "soap, and place the tank on a level stand away from direct sunlight and radiators. Fill it slowly with "
    "dechlorinated water, install the filter and the heater, and let the system run for at least four weeks "
    "before adding any fish, so that beneficial bacteria can establish themselves in the filter media. Test the "
    "water every few days during this cycle: ammonia and nitrite should rise and then fall to zero, while nitrate "
    "slowly accumulates. Once the readings are stable, add a few hardy fish at a time, feed them sparingly, and "
    "change about a quarter of the water every week to keep nitrate low and the fish healthy for years."
)
GUIDE_COPY = GUIDE.replace("takes patience", "takes a lot of patience").replace("every week", "each week")

NEAR = [
    ("Explain photosynthesis to a curious ten-year-old.", "Explain photosynthesis to a curious ten year old, please.",
     "Photosynthesis is how green plants make their own food. Their leaves catch sunlight and use its energy to "
     "turn water from the soil and carbon dioxide from the air into sugar, which the plant uses to grow. Along "
     "the way the plant gives off oxygen, which is the air that all people and animals need to breathe."),
    ("Describe how a bill becomes a law in the United States.",
     "Describe how a bill becomes a law in the United States.",
     "A member of Congress introduces the bill, a committee studies and amends it, and both the House and the "
     "Senate must pass the same text. The President then signs it into law or vetoes it; a two-thirds majority "
     "of both chambers can override a veto."),
    ("How should I prepare for a job interview?", "How should I get ready for a job interview?",
     "Research the company and the role, prepare short stories that show your skills, practise answering common "
     "questions out loud, and have two or three thoughtful questions of your own ready for the end."),
    ("What are the main causes of inflation?", "What are the main causes of inflation?",
     "Inflation rises when demand grows faster than the economy can produce, when costs such as energy or wages "
     "go up and are passed on to prices, and when people expect prices to keep rising and act on that."),
    ("How do I read a file line by line in Python?", "How do I read a file line by line in Python?",
     "Open it in a with block and iterate over it:\n\n```python\nwith open('data.txt') as handle:\n    for line in "
     "handle:\n        print(line.rstrip())\n```\n\nThe file is closed when the block ends."),
    ("What does `git rebase -i HEAD~3` do?", "What does `git rebase -i HEAD~3` do?",
     "It opens an editor listing the last three commits, in which you can reorder, squash, edit or drop them "
     "before they are replayed on top of HEAD~3."),
]


def main():
  RAW.mkdir(exist_ok=True)
  rows, gold = [], []

  def add(instruction, output, expect="keep", stage="", reason="", why=""):
    rows.append({"instruction": instruction, "input": "", "output": output})
    gold.append({"id": f"records.jsonl:{len(rows)}", "expect": expect, "stage": stage, "reason": reason, "why": why})

  for group, why in ((SHORT, "short English instruction"), (ARITHMETIC, "arithmetic family"),
                     (ONE_WORD, "one-word-answer family"), (CODE, "code question"), (PROSE, "prose answer")):
    for instruction, output in group:
      add(instruction, output, why=why)
  for lang, instruction, output in FOREIGN:
    add(instruction, output, "drop", "filter", "language", f"written in {lang}")
  for instruction, output in REFUSALS:
    add(instruction, output, "drop", "filter", "refusal boilerplate", "refusal")
  for instruction, output, stage, reason in EMPTY:
    add(instruction, output, "drop", stage, reason, "empty or trivial response")
  originals = {r["instruction"]: g["id"] for r, g in zip(rows, gold)}

  copies, copy_gold = [], []
  for reason, group in (("exact duplicate", EXACT), ("near duplicate", NEAR)):
    for original, instruction, output in group:
      of = originals[original]
      copies.append({"instruction": instruction, "input": "", "output": output})
      copy_gold.append({"id": f"records_copies.jsonl:{len(copies)}", "expect": "drop", "stage": "dedup",
                        "reason": reason, "of": of, "why": f"a copy of {of}"})

  (RAW / "docs").mkdir(exist_ok=True)
  (RAW / "docs" / "guide.txt").write_text(GUIDE + "\n", encoding="utf-8")
  (RAW / "docs" / "guide_copy.txt").write_text(GUIDE_COPY + "\n", encoding="utf-8")
  gold.append({"id": "docs/guide.txt", "expect": "keep", "stage": "", "reason": "", "why": "a long document"})
  copy_gold.append({"id": "docs/guide_copy.txt", "expect": "drop", "stage": "dedup", "reason": "near duplicate",
                    "of": "docs/guide.txt", "why": "a copy of docs/guide.txt with a few words changed"})
  outputs = {RAW / "records.jsonl": rows, RAW / "records_copies.jsonl": copies, HERE / "gold.jsonl": gold + copy_gold}
  for path, lines in outputs.items():
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


if __name__ == "__main__":
  main()
