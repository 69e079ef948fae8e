"""Writes reasoning-mc.jsonl: the project's small multiple-choice reasoning set (issue 19.5).

Three kinds of item, each made from templates with a fixed seed, so the file is reproducible
and every answer is computed, not typed:

- arithmetic: word problems with several steps (totals, change, rates, sharing, percentages,
  ages); the wrong options are the answers of plausible slips (a step left out, the wrong
  operation);
- logic: syllogisms, orderings, contrapositives and what does *not* follow;
- false premise: a short passage, then a question that presupposes something the passage
  contradicts; the right option rejects the premise.

Format (one JSON object a line, as multiple-choice sets on the Hub): id, category, question,
choices (4 strings), answer (the index of the right choice).

    python examples/reasoning/make_items.py      # rewrites reasoning-mc.jsonl next to this file
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Bilal", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jonas", "Kemi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas", "Uma", "Vera", "Wen", "Yusuf", "Zara"]
THINGS = ["apples", "pencils", "stamps", "marbles", "books", "cards", "shells", "buttons"]
TOWNS = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Perth", "Tbilisi", "Lyon", "Cusco", "Riga"]


def options(rng: random.Random, right, wrong: list) -> tuple[list[str], int]:
    """Four distinct choices, the right one at a random place."""
    seen, distinct = {str(right)}, []
    for w in wrong:
        if str(w) not in seen:
            seen.add(str(w))
            distinct.append(str(w))
    bump = 1
    while len(distinct) < 3:  # a slip that happened to equal another: fill with a near miss
        candidate = str(right + bump) if isinstance(right, int) else f"{right} ({bump})"
        bump += 1
        if candidate not in seen:
            seen.add(candidate)
            distinct.append(candidate)
    choices = distinct[:3]
    at = rng.randrange(4)
    choices.insert(at, str(right))
    return choices, at


def arithmetic(rng: random.Random) -> tuple[str, object, list]:
    kind = rng.randrange(6)
    a, b, c = rng.randint(3, 19), rng.randint(2, 9), rng.randint(2, 12)
    n1, n2 = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    if kind == 0:
        q = f"{n1} has {a} {thing} and buys {b} bags with {c} {thing} in each. How many {thing} does {n1} have now?"
        return q, a + b * c, [a + b + c, (a + b) * c, b * c]
    if kind == 1:
        price, count = rng.randint(2, 9), rng.randint(2, 6)
        paid = 50 if price * count < 50 else 100
        q = (f"{n1} buys {count} notebooks at {price} dollars each and pays with a {paid}-dollar note. "
             f"How much change does {n1} get, in dollars?")
        return q, paid - price * count, [paid - price, price * count, paid - price - count]
    if kind == 2:
        speed, hours, rest = rng.randint(3, 9) * 10, rng.randint(2, 5), rng.randint(1, 3)
        q = (f"A train runs at {speed} km per hour for {hours} hours, stops for {rest} hours, then runs "
             f"{hours} more hours at the same speed. How many kilometres does it cover?")
        return q, speed * hours * 2, [speed * hours, speed * (2 * hours + rest), speed * (hours + rest)]
    if kind == 3:
        people, each = rng.randint(3, 8), rng.randint(3, 9)
        extra = rng.randint(1, people - 1)
        total = people * each + extra
        q = (f"{n1} shares {total} {thing} equally among {people} friends and keeps what is left over. "
             f"How many {thing} does {n1} keep?")
        return q, extra, [each, total // people + 1, people - extra]
    if kind == 4:
        price = rng.randint(2, 9) * 20
        pct = rng.choice([10, 20, 25, 50])
        q = f"A coat costs {price} dollars. In a sale it is {pct} percent cheaper. What does it cost in the sale, in dollars?"
        return q, price - price * pct // 100, [price * pct // 100, price - pct, price + price * pct // 100]
    age, gap, years = rng.randint(5, 15), rng.randint(2, 9), rng.randint(2, 10)
    q = (f"{n1} is {age} years old and {n2} is {gap} years older. How old will {n2} be in {years} years?")
    return q, age + gap + years, [age + years, age + gap, gap + years]


def logic(rng: random.Random) -> tuple[str, str, list]:
    kind = rng.randrange(4)
    if kind == 0:
        x, y, z = rng.sample(["glorps", "fendles", "mibbits", "tarks", "wumbles", "zorns", "plinks", "quests"], 3)
        q = f"All {x} are {y}. No {y} are {z}. Which statement must be true?"
        return q, f"No {x} are {z}.", [f"Some {x} are {z}.", f"All {z} are {x}.", f"All {y} are {x}."]
    if kind == 1:
        people = rng.sample(NAMES, 4)
        adj, least = rng.choice([("taller", "shortest"), ("older", "youngest"), ("faster", "slowest")])
        a, b, c, d = people
        q = f"{a} is {adj} than {b}. {b} is {adj} than {c}. {c} is {adj} than {d}. Who is the {least}?"
        return q, d, [a, b, c]
    if kind == 2:
        event, result = rng.choice([("it rains", "the street is wet"), ("the alarm rings", "the guards wake up"),
                                    ("the lamp is on", "the room is bright"), ("the oven is hot", "the bread bakes")])
        q = f"If {event}, then {result}. We know that it is not the case that {result}. What follows?"
        return q, f"It is not the case that {event}.", [f"It is the case that {event}.",
                                                        "Nothing at all can be concluded from this.",
                                                        f"It is the case that {result}."]
    n1 = rng.choice(NAMES)
    sport = rng.choice(["chess", "tennis", "the piano", "rowing"])
    q = (f"Everyone in the club plays {sport}. {n1} plays {sport}. Which conclusion is justified?")
    return q, f"{n1} may or may not be in the club.", [f"{n1} must certainly be in the club.",
                                                       f"{n1} cannot possibly be in the club.",
                                                       f"Everyone who plays {sport} is in the club."]


def false_premise(rng: random.Random) -> tuple[str, str, list]:
    """The wrong options are as long as the right one, so a model cannot win (or lose) on length."""
    kind = rng.randrange(3)
    n1 = rng.choice(NAMES)
    if kind == 0:
        town = rng.choice(TOWNS)
        went, other = rng.sample(["train", "bus", "ferry", "car"], 2)
        passage = f"{n1} travelled to {town} by {went} on Monday and came back by {other} on Thursday."
        q = f"Passage: {passage}\nQuestion: Why did {n1} fly to {town}?"
        return q, f"{n1} did not fly: the passage says the trip was by {went}.", [
            f"Because flights to {town} were cheaper than the {went} that week.",
            f"Because {n1} wanted to visit family in {town} quickly.",
            f"Because the {went} to {town} was cancelled on Monday."]
    if kind == 1:
        crop, other = rng.sample(["wheat", "barley", "potatoes", "rice", "beans"], 2)
        passage = f"The farm grew only {crop} this year; last year it grew {other}."
        q = f"Passage: {passage}\nQuestion: How much {other} did the farm harvest this year?"
        return q, f"None: the passage says the farm grew only {crop} this year.", [
            f"More {other} than the farm harvested last year.",
            f"About half as much {other} as it harvested of {crop}.",
            f"The same amount of {other} that it harvested last year."]
    day, other = rng.sample(["Monday", "Tuesday", "Wednesday", "Friday", "Saturday"], 2)
    passage = f"The museum is closed on {day}. {n1} visited it on {other} and liked the maps most."
    q = f"Passage: {passage}\nQuestion: What did {n1} like most when visiting the museum on {day}?"
    return q, f"{n1} did not visit on {day}: the museum is closed on {day}.", [
        f"The old maps of the city, which {n1} liked most.", "The paintings in the main hall on the first floor.",
        "The gift shop near the entrance of the museum."]


KINDS = {"arithmetic": (arithmetic, 120), "logic": (logic, 110), "false_premise": (false_premise, 90)}


def items(seed: int = 19) -> list[dict]:
    rng, out, seen = random.Random(seed), [], set()
    for category, (make, n) in KINDS.items():
        made = 0
        while made < n:
            question, right, wrong = make(rng)
            if question in seen:
                continue
            seen.add(question)
            choices, answer = options(rng, right, wrong)
            out.append({"id": f"{category}-{made:03d}", "category": category, "question": question,
                        "choices": choices, "answer": answer})
            made += 1
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("reasoning-mc.jsonl")
    rows = items()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} items to {path}")
