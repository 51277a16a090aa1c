"""A long synthetic conversation for the demo and the benchmarks: deterministic, varied, a little multilingual.

A team plans a product launch over many days: dates, budgets, decisions, code
reviews, travel, recipes for the launch party, and some French, German,
Chinese, Russian and Greek. Facts stated early (the launch date, the budget,
the venue) come back later, so questions about old turns have answers.
"""

from __future__ import annotations

import random

FACTS = {
    "launch": "the launch date is March 3rd",
    "budget": "the marketing budget is 48,500 euros",
    "venue": "the launch party is at the Harbour Hall in Rotterdam",
    "owner": "Priya owns the release checklist",
    "codename": "the project codename is Blue Heron",
}

_NAMES = ["Priya", "Tomás", "Mei", "Olek", "Sana", "Jonas", "Élodie", "Kwame", "Nikos", "Ana"]
_CITIES = ["Rotterdam", "Lyon", "Kraków", "Osaka", "Porto", "Tallinn", "Thessaloniki", "Hamburg"]
_THINGS = [
    "the onboarding flow", "the billing service", "the Redis cluster", "the mobile app",
    "the status page", "the search index", "the pricing page", "the export job",
]
_FOODS = ["lemon risotto", "shakshuka", "mapo tofu", "pierogi", "pastéis de nata", "moussaka"]

_USER = [
    "Can you summarise where we are with {thing}? {name} asked me this morning.",
    "Reminder for the notes: {fact}.",
    "What should we tell {name} about {thing} before the review on {day}?",
    "I am flying to {city} on {day}. Is there anything for the launch I should bring?",
    "Draft a short message to the team about {thing}, friendly but firm.",
    "How many hours did we estimate for {thing}? I think it was {n} but I am not sure.",
    ("Here is the failing test, can you see why?\n```python\ndef test_total():\n"
    "    assert total([{n}, {m}]) == {s}\n```"),
    "Give me a recipe for {food} for {n} people, for the launch party.",
    "Please translate for the {city} partners: \"{phrase}\"",
    "Remind me: what did we decide about {topic}?",
    "{name} says {thing} is blocked on the database migration. Options?",
    "Compare the two offers: {n}00 euros per month versus {m}50 euros once.",
]

_ASSISTANT = [
    ("Status of {thing}: the main work is done, {n} tasks remain, and {name} is reviewing the last "
    "pull request. The risk is the data migration, which we can rehearse on {day}."),
    "Noted: {fact}. I will keep it in the project notes and mention it in the weekly summary.",
    ("For {name}, I would lead with the outcome: {thing} is on track for the launch, then list the "
    "two open questions and the decision we need by {day}."),
    ("For {city} bring the demo laptop, two HDMI adapters, the printed checklist and the "
    "signed partner agreement. The venue has Wi-Fi but the upload is slow."),
    ("Hi all, a quick note on {thing}: please finish your reviews by {day}. If something is "
    "blocked, say so in the channel today so {name} can help. Thanks!"),
    "The estimate in the plan is {n} hours for {thing}, with a buffer of {m} hours for testing.",
    ("The test fails because total() returns {s2} for [{n}, {m}]: it drops the last element. "
    "Change range(len(xs) - 1) to range(len(xs)) and it passes."),
    ("{food} for {n}: buy fresh ingredients the day before, cook in two batches, and keep it "
    "warm in a low oven. Plan about {m} minutes of preparation."),
    "Translation: «{translated}»",
    "We decided that {fact}. {name} confirmed it in the meeting on {day}.",
    ("Three options: postpone the migration, run it in read-only mode for an hour, or split the "
    "table first. I recommend the read-only window on {day}, it is the least risky."),
    ("The monthly offer costs {n}00 euros a month; the one-off offer pays for itself after "
    "about {k} months. Take the one-off offer if we keep the tool for a year."),
]

_PHRASES = [
    ("We are excited to show you the new release.", {
        "Lyon": "Nous sommes ravis de vous présenter la nouvelle version.",
        "Hamburg": "Wir freuen uns, Ihnen die neue Version zu zeigen.",
        "Osaka": "我们很高兴向您展示新版本。",
        "Kraków": "Мы рады показать вам новую версию.",
        "Thessaloniki": "Είμαστε ενθουσιασμένοι που σας δείχνουμε τη νέα έκδοση.",
    }),
    ("The launch party starts at seven.", {
        "Lyon": "La fête de lancement commence à sept heures.",
        "Hamburg": "Die Launch-Party beginnt um sieben Uhr.",
        "Osaka": "发布派对七点开始。",
        "Kraków": "Вечеринка по случаю запуска начинается в семь.",
        "Thessaloniki": "Το πάρτι της κυκλοφορίας αρχίζει στις επτά.",
    }),
]

_TOPICS = {"the launch date": "launch", "the budget": "budget", "the venue": "venue",
           "the checklist": "owner", "the codename": "codename"}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def build_conversation(turns: int = 1000, seed: int = 7) -> list[dict[str, str]]:
    """`turns` messages (a system message, then user and assistant alternating), the same for a seed."""
    if turns < 1:
        raise ValueError(f"a conversation needs at least one turn, got {turns}")
    rng = random.Random(seed)
    messages = [{
        "role": "system",
        "content": "You are the project assistant of a small team preparing a product launch. "
        "Keep track of decisions, dates and numbers.",
    }]
    facts = list(FACTS.values())
    while len(messages) < turns:
        k = rng.randrange(len(_USER))
        if len(messages) < 2 * len(facts) + 1:  # state every fact early on
            k = 1
        topic = rng.choice(list(_TOPICS))
        phrase, translations = rng.choice(_PHRASES)
        city = rng.choice(list(translations) if k == 8 else _CITIES)
        n, m = rng.randint(2, 40), rng.randint(2, 40)
        slots = {
            "name": rng.choice(_NAMES), "thing": rng.choice(_THINGS), "city": city,
            "day": rng.choice(_DAYS), "food": rng.choice(_FOODS), "n": n, "m": m,
            "s": n + m, "s2": n, "k": max(1, (m * 10 + 50) // max(1, n * 100) + 1),
            "phrase": phrase, "translated": translations.get(city, phrase), "topic": topic,
            "fact": facts[(len(messages) // 2) % len(facts)] if k == 1 else FACTS[_TOPICS[topic]],
        }
        messages.append({"role": "user", "content": _USER[k].format(**slots)})
        if len(messages) < turns:
            messages.append({"role": "assistant", "content": _ASSISTANT[k].format(**slots)})
    return messages
