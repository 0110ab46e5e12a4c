"""A built-in corpus of templated dialogues and one-sentence summaries, small enough to learn in minutes
(`data.source: synthetic`)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from dsum.config import RecipeError
from dsum.data.example import Example

SPLITS = ("train", "validation", "test")
MIN_WORDS, MAX_WORDS = 40, 90
MIN_TURNS, MAX_TURNS = 4, 8

NAMES = (
    "Tom", "Mary", "John", "Linda", "David", "Susan", "Peter", "Emma", "James", "Anna",
    "Mike", "Kate", "Jack", "Lucy", "Paul", "Sarah", "Mark", "Helen", "Steve", "Amy",
    "Brian", "Julia", "Frank", "Grace", "Henry", "Nancy", "Alex", "Rose", "Daniel", "Laura",
)  # fmt: skip
COUNTS = ("two", "three", "four", "five", "six")
SMALL_COUNTS = ("one", "two", "three", "four")
YEARS = ("two", "three", "four", "five", "six", "seven", "eight", "ten")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENING_TIMES = ("6 pm", "6:30 pm", "7 pm", "7:30 pm", "8 pm", "8:30 pm", "9 pm")
ANY_TIMES = ("9 am", "10 am", "11 am", "noon", "2 pm", "3 pm", "4 pm", "5 pm") + EVENING_TIMES
STREETS = ("Green", "Park", "King", "Church", "High", "Oak", "Hill", "Bridge", "Lake", "North")
CITIES = ("London", "Paris", "Boston", "Chicago", "Berlin", "Rome", "Madrid", "Dublin", "Oxford", "York")


@dataclass(frozen=True)
class Scene:
    """One dialogue's core: `lines` alternate between A (who speaks first) and B.

    `summary` refers to the speakers as {a} and {b}; `opening` is a line of B's that may be put first.
    """

    lines: list[str]
    summary: str
    opening: str


Scenario = Callable[[random.Random, str | None, str | None], Scene]


def _intro(rng: random.Random, name: str | None) -> str:
    greeting = _maybe(rng, rng.choice(("Good morning. ", "Hello there. ", "Hi, good afternoon. ")), 0.4)
    if name is None:
        return greeting
    return greeting + rng.choice(("This is {}. ", "My name is {}. ", "I'm {}. ")).format(name)


def _maybe(rng: random.Random, text: str, p: float = 0.5) -> str:
    """`text` with probability p, else nothing: filler that never reaches the summary."""
    return text if rng.random() < p else ""


def _dollars(rng: random.Random, low: int, high: int, step: int) -> str:
    return str(rng.randrange(low, high + 1, step))


def book_table(rng: random.Random, a: str | None, b: str | None) -> Scene:
    people, day, time = rng.choice(COUNTS), rng.choice(DAYS), rng.choice(EVENING_TIMES)
    lines = [
        _intro(rng, a) + rng.choice((
            f"I'd like to book a table for {people} on {day}, please.",
            f"Can I reserve a table for {people} people on {day}?",
        )),
        rng.choice(("Certainly. What time would you like?", "Of course. For what time?")),
        rng.choice((f"At {time}, if possible.", f"Around {time}, please."))
        + _maybe(rng, rng.choice((" It's a birthday dinner.", " And could we sit by the window?"))),
    ]
    if rng.random() < 0.3:
        time = rng.choice([t for t in EVENING_TIMES if t != time])
        lines += [f"I'm sorry, we are full then. Is {time} all right?", f"Yes, {time} is fine."]
    else:
        lines += [f"No problem. A table for {people} at {time} on {day}."]
    return Scene(lines, f"{{a}} books a table for {people} at {time} on {day}.",
                 "Good evening, Rosa's Restaurant. How can I help you?")


def buy_ticket(rng: random.Random, a: str | None, b: str | None) -> Scene:
    count, city, day = rng.choice(SMALL_COUNTS[1:]), rng.choice(CITIES), rng.choice(DAYS)
    kind, price = rng.choice(("single", "return")), _dollars(rng, 20, 120, 5)
    lines = [
        _intro(rng, a)
        + rng.choice((f"I need {count} tickets to {city}, please.", f"Can I buy {count} tickets to {city}?")),
        "Single or return?",
        f"{kind.capitalize()}, please. We are leaving on {day}.",
        f"OK. {count.capitalize()} {kind} tickets for {day}. That will be {price} dollars.",
    ]
    if rng.random() < 0.5:
        lines += ["Can I pay by card?", "Yes, of course."]
    return Scene(lines, f"{{a}} buys {count} {kind} train tickets to {city} for {day}, which cost {price} dollars.",
                 "Good morning. Where would you like to go?")


def doctor(rng: random.Random, a: str | None, b: str | None) -> Scene:
    symptom = rng.choice(("a headache", "a fever", "a cough", "a sore throat", "a stomach ache", "back pain"))
    days = rng.choice(COUNTS)
    advice = rng.choice(("rest for a few days", "drink more water", "take this medicine twice a day",
                         "stay in bed", "come back next week"))
    lines = [
        _intro(rng, a) + f"I have had {symptom} for {days} days.",
        rng.choice(("Do you have any other problems?", "I see. Does anything else hurt?")),
        rng.choice((f"No, just {symptom}.", "No, nothing else.")),
        _maybe(rng, "Let me have a look. ") + f"It's nothing serious. You should {advice}.",
        rng.choice(("All right, I will.", "OK, thank you, doctor.")),
    ]
    return Scene(lines, f"{{a}} has had {symptom} for {days} days and is told to {advice}.",
                 "Good morning. What seems to be the problem?")


def return_item(rng: random.Random, a: str | None, b: str | None) -> Scene:
    item = rng.choice(("shirt", "jacket", "lamp", "phone", "watch", "bag", "kettle", "toaster", "camera", "radio"))
    problem = rng.choice(("broken", "too small", "too big", "the wrong color", "not working"))
    day, price = rng.choice(DAYS), _dollars(rng, 10, 90, 5)
    lines = [
        _intro(rng, a) + f"I bought this {item} here on {day}, but it is {problem}.",
    ]
    if rng.random() < 0.5:
        lines += ["I'm sorry to hear that. Do you have the receipt?", "Yes, here it is."]
    lines += ["I see. Would you like a refund or a new one?"]
    if rng.random() < 0.5:
        lines += ["A refund, please.", f"OK. Here are your {price} dollars."]
        summary = f"{{a}} returns a {item} that is {problem} and gets a refund of {price} dollars."
    else:
        lines += ["I'd like a new one, please.", f"No problem. Here is a new {item}."]
        summary = f"{{a}} returns a {item} that is {problem} and gets a new one."
    return Scene(lines, summary, "Hello. What can I do for you?")


def directions(rng: random.Random, a: str | None, b: str | None) -> Scene:
    place = rng.choice(("post office", "train station", "museum", "library", "hospital", "bank", "cinema", "park"))
    landmark = rng.choice(("church", "supermarket", "traffic lights", "bridge", "school"))
    turn, minutes, bus = rng.choice(("left", "right")), rng.choice(("five", "ten", "fifteen")), rng.randint(3, 40)
    lines = [
        "Excuse me. " + _maybe(rng, "I'm new in town. ") + f"How can I get to the {place}?",
        f"Go straight along this street and turn {turn} at the {landmark}.",
        "Is it far?",
    ]
    if rng.random() < 0.5:
        lines += [f"No, it is about {minutes} minutes on foot." + _maybe(rng, " You can't miss it.")]
        summary = f"{{a}} asks the way to the {place} and is told to turn {turn} at the {landmark}."
    else:
        lines += [f"It's quite far. You should take bus number {bus} after the {landmark}."]
        summary = f"{{a}} asks the way to the {place} and is told to take bus number {bus}."
    return Scene(lines, summary, "Hello. You look lost. Can I help you?")


def job_interview(rng: random.Random, a: str | None, b: str | None) -> Scene:
    job = rng.choice(("sales manager", "teacher", "engineer", "accountant", "nurse", "designer", "driver", "cook"))
    years, day = rng.choice(YEARS), rng.choice(DAYS)
    lines = [
        _intro(rng, a) + f"I have worked as a {job} for {years} years.",
        "Why do you want this job?",
        rng.choice(("I like working with people and I want to learn more.",
                    "Your company is well known and I want a new challenge.")),
        "When can you start?",
        f"I can start on {day}.",
        "Good. We will call you next week.",
    ]
    return Scene(lines, f"{{a}} has {years} years of experience as a {job} and can start on {day}.",
                 "Please sit down. Can you tell me about yourself?")


def rent_flat(rng: random.Random, a: str | None, b: str | None) -> Scene:
    size, street = rng.choice(("one-bedroom", "two-bedroom", "three-bedroom", "small", "large")), rng.choice(STREETS)
    price = _dollars(rng, 500, 1500, 50)
    lines = [
        _intro(rng, a) + f"I'm calling about the {size} flat on {street} Street.",
        f"Yes, it is still free. The rent is {price} dollars a month.",
        *rng.choice((("Does that include water and electricity?", "Yes, it does."),
                     ("Is it close to the station?", "Yes, it is a short walk."))),
    ]
    if rng.random() < 0.5:
        lines += ["Can I see it this week?", f"Yes, you can come on {rng.choice(DAYS)} afternoon."]
    if rng.random() < 0.6:
        lines += ["Great. I'll take it."]
        summary = f"{{a}} rents the {size} flat on {street} Street for {price} dollars a month."
    else:
        lines += ["That is too expensive for me. I'll think about it."]
        summary = f"{{a}} finds the {size} flat on {street} Street too expensive at {price} dollars a month."
    return Scene(lines, summary, "Hello, Green Homes. How can I help you?")


def order_food(rng: random.Random, a: str | None, b: str | None) -> Scene:
    food = rng.choice((("pizza", "pizzas"), ("burger", "burgers"), ("salad", "salads"), ("sandwich", "sandwiches")))
    count = rng.choice(SMALL_COUNTS)
    dish = f"{count} {food[0] if count == 'one' else food[1]}"
    drink = rng.choice(("cola", "coffee", "tea", "lemonade", "orange juice", "milkshake"))
    street, minutes = rng.choice(STREETS), rng.choice(("twenty", "thirty", "forty"))
    lines = [
        _intro(rng, a) + f"I'd like {dish} and a {drink}, please.",
        *(("Anything else?", "No, that's all.") if rng.random() < 0.5 else ()),
        "Is that for delivery?",
        f"Yes, to {rng.randint(2, 90)} {street} Street.",
        f"OK. It will be there in {minutes} minutes.",
    ]
    return Scene(lines, f"{{a}} orders {dish} and a {drink}, delivered to {street} Street in {minutes} minutes.",
                 "Hello, Lucky Kitchen. What can I get you?")


def hotel_room(rng: random.Random, a: str | None, b: str | None) -> Scene:
    room, nights, day = rng.choice(("single", "double", "twin", "family")), rng.choice(COUNTS), rng.choice(DAYS)
    price = _dollars(rng, 60, 200, 10)
    lines = [
        _intro(rng, a) + f"I'd like to book a {room} room for {nights} nights from {day}.",
        f"Let me check. Yes, we have one. It is {price} dollars a night."
        + _maybe(rng, " The room has a nice view of the lake."),
        "Does that include breakfast?",
        rng.choice(("Yes, breakfast is from 7 to 10.", "No, breakfast is 10 dollars extra.")),
        "OK, I'll take it.",
    ]
    return Scene(lines, f"{{a}} books a {room} room for {nights} nights from {day} at {price} dollars a night.",
                 "Good afternoon, Park Hotel. Can I help you?")


def bank_account(rng: random.Random, a: str | None, b: str | None) -> Scene:
    amount, days = _dollars(rng, 100, 900, 50), rng.choice(("three", "five", "seven", "ten"))
    document = rng.choice(("passport", "ID card", "driving licence"))
    lines = [
        _intro(rng, a) + "I'd like to open a savings account.",
        f"Sure. Can I see your {document}, please?",
        f"Here you are. I want to put in {amount} dollars today.",
        f"No problem. Your bank card will arrive in {days} days.",
    ]
    if rng.random() < 0.5:
        lines += ["Is there a monthly fee?", "No, there is no fee for this account."]
    return Scene(lines, f"{{a}} opens a savings account with {amount} dollars and will get a card in {days} days.",
                 "Good morning. What can I do for you today?")


def meet_friend(rng: random.Random, a: str | None, b: str | None) -> Scene:
    plan = rng.choice(("see a film at the cinema", "have lunch at the Italian restaurant", "play tennis at the park",
                       "go swimming at the pool", "have coffee at the cafe", "study at the library"))
    day, time = rng.choice(DAYS), rng.choice(ANY_TIMES)
    hello = f"Hi {b}" if b else "Hi"
    lines = [
        f"{hello}, it's {a}." if a else f"{hello}.",
        "Oh, hello! How are you?",
        "Fine, thanks. " + _maybe(rng, "I have a free day this week. ") + f"Would you like to {plan} on {day}?",
        "Sounds great. What time?",
        f"How about {time}?",
        "Perfect. See you then.",
    ]
    return Scene(lines, f"{{a}} and {{b}} agree to {plan} at {time} on {day}.", "Hello?")


SCENARIOS: tuple[Scenario, ...] = (
    book_table, buy_ticket, doctor, return_item, directions, job_interview,
    rent_flat, order_food, hotel_room, bank_account, meet_friend,
)  # fmt: skip

# Closings that never reach the summary, by who spoke last.
CLOSINGS_AFTER_A = (
    ("Is there anything else I can help you with?", "No, that's all. Thank you very much."),
    ("Is there anything else?", "No, thanks. Goodbye."),
    ("Great. Have a nice day.",),
)
CLOSINGS_AFTER_B = (
    ("Thank you very much for your help.", "You're welcome. Have a nice day."),
    ("Thanks a lot.", "My pleasure. Goodbye."),
    ("Thanks for your help.",),
)


def compose(rng: random.Random) -> tuple[str, str]:
    """One dialogue and its summary, in DialogSum's format; may fall outside the length limits.

    Eleven everyday scenarios (booking a table, buying tickets, a doctor's visit, ...) are filled with slots
    (names, numbers, times, days, places, items) that the summary copies from the dialogue; a few outcomes change
    the summary's wording, and greetings and thanks that never reach the summary pad the dialogue, so a model has
    to pick out what matters. The vocabulary is a few hundred words.
    """
    scenario = rng.choice(SCENARIOS)
    a = rng.choice(NAMES) if rng.random() < 0.75 else None
    b = rng.choice([name for name in NAMES if name != a]) if scenario is meet_friend and rng.random() < 0.75 else None
    scene = scenario(rng, a, b)
    b_first = rng.random() < 0.6
    lines = ([scene.opening] if b_first else []) + scene.lines
    if scenario is not meet_friend and rng.random() < 0.6:
        a_spoke_last = (len(lines) - b_first) % 2 == 1
        lines += list(rng.choice(CLOSINGS_AFTER_A if a_spoke_last else CLOSINGS_AFTER_B))
    tag_a, tag_b = ("#Person2#", "#Person1#") if b_first else ("#Person1#", "#Person2#")
    dialogue = "\n".join(f"#Person{(i % 2) + 1}#: {line}" for i, line in enumerate(lines))
    summary = scene.summary.format(a=_stated(a, dialogue) or tag_a, b=_stated(b, dialogue) or tag_b)
    return dialogue, summary


def _stated(name: str | None, dialogue: str) -> str | None:
    """The name if the dialogue says it; a summary names only the speakers the dialogue names."""
    return name if name and re.search(rf"\b{name}\b", dialogue) else None


def split_of(dialogue: str) -> str:
    """The split a dialogue text belongs to: 80% train, 10% validation, 10% test, by its SHA-256."""
    bucket = int.from_bytes(hashlib.sha256(dialogue.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _fits(dialogue: str) -> bool:
    turns = dialogue.split("\n")
    words = sum(len(turn.split()) - 1 for turn in turns)  # not counting the "#PersonN#:" tags
    return MIN_TURNS <= len(turns) <= MAX_TURNS and MIN_WORDS <= words <= MAX_WORDS


def generate(split: str, n: int, seed: int) -> list[Example]:
    """`n` distinct dialogues of `split` ('train', 'validation' or 'test'), ids `synthetic-<split>-000000`...

    Splits never share a dialogue: each dialogue text belongs to one split by its SHA-256 (`split_of`), and a
    split's generator keeps only the dialogues that belong to it. Output depends only on (split, n, seed).
    """
    if split not in SPLITS:
        raise RecipeError(f"synthetic split {split!r}: expected one of {', '.join(SPLITS)}")
    rng = random.Random(f"dsum-synthetic/{seed}/{split}")  # str seeds are hashed with SHA-512: stable everywhere
    seen: set[str] = set()
    examples: list[Example] = []
    for _ in range(50 * n + 1000):
        if len(examples) == n:
            return examples
        dialogue, summary = compose(rng)
        if dialogue in seen or not _fits(dialogue) or split_of(dialogue) != split:
            continue
        seen.add(dialogue)
        examples.append(Example(f"synthetic-{split}-{len(examples):06d}", dialogue, (summary,)))
    if len(examples) == n:
        return examples
    raise RecipeError(f"synthetic split {split!r}: could only make {len(examples)} distinct dialogues of {n} asked for")
