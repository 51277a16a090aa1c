"""Long two-person conversations with planted facts and questions whose evidence is known.

`make_conversations(n, seed)` builds `n` conversations between a user and an
assistant, the same for the same seed (stdlib `random` with a fixed seed, no
network, no data files). Each conversation:

- has a short system turn, then 300-600 user/assistant turns in 20-34 sessions,
  days apart, every turn stamped with a `created_at` (Unix seconds, UTC);
- talks about work, travel, food, health, family, hobbies, plans, money and
  numbers, with chit-chat of varied length;
- holds 13,000-25,000 tokens of turn content (cl100k, `optical_memory.tokens`),
  several 8192-position windows;
- plants facts at every age ("my sister Maya has moved to Lisbon", "the keypad
  code for the storage unit on Mill Road is 4417"), and mentions the same people
  and things elsewhere without the fact (distractors: "Maya called to ask for
  my lasagne recipe", "the storage unit is getting full");
- asks questions that paraphrase the facts ("Which city is Maya living in these
  days?"): `fact` questions (one evidence turn), `multi-hop` questions that
  join two facts (two evidence turns: "What's the flight number for my trip to
  see my sister?" needs the sister's city and the flight to that city), and
  `temporal` questions answered from the turns' dates ("Which happened earlier,
  the dentist visit or filing the tax return?", "How many days were there
  between ...?", "What did I begin about a week after the dentist visit?",
  "What was the date of ...?").

Every question knows its evidence (indexes into `messages`, the system turn
being index 0), a short gold answer, and for each evidence turn of a fact or
multi-hop question a key string that the turn contains (`entities`). Questions
are asked after the last turn. Names, places and numbers are plain ASCII, so an
English OCR reader can read them back (see ocr_check.py).
"""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

SYSTEM = (
    "You are a friendly personal assistant. You chat with the user over many days "
    "and help them keep track of plans, people, numbers and errands."
)
TURNS = (300, 600)  # user/assistant turns per conversation (the system turn aside)
TOKENS = (13_000, 25_000)  # cl100k tokens of turn content per conversation
START = datetime(2025, 1, 6, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Question:
    """A question asked after the conversation, with the turns that answer it.

    `evidence`: indexes into `Conversation.messages`, ascending. `entities`: for
    each evidence turn, a key string (a name, a place, a thing) that the turn
    contains (empty for temporal questions). `answer`: a short gold answer.
    """

    text: str
    kind: str  # "fact", "multi-hop" or "temporal"
    evidence: tuple[int, ...]
    answer: str
    entities: tuple[str, ...] = ()


@dataclass
class Conversation:
    """One session: OpenAI-format messages with `created_at`, and the questions about it."""

    session_id: str
    messages: list[dict]
    questions: list[Question] = field(default_factory=list)

    def chat(self) -> list[dict]:
        """The messages without `created_at` (role and content only)."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]


# ------------------------------------------------------------------------ the cast
WOMEN = ["Maya", "Ines", "Clara", "Noor", "Hana", "Leila", "Greta", "Sofia", "Anika", "Rosa",
         "Yara", "Freya", "Petra", "Alma"]
MEN = ["Tomas", "Idris", "Felix", "Mateo", "Jonas", "Ravi", "Oskar", "Luca", "Emil", "Kenji",
       "Arlo", "Hugo", "Bruno", "Caspar"]
SURNAMES = ["Okafor", "Lindqvist", "Moreau", "Castillo", "Brennan", "Novak", "Haddad", "Ferreira",
            "Kowalski", "Whitfield", "Duarte", "Achebe", "Halloran", "Petrakis"]
CITIES = ["Lisbon", "Porto", "Tallinn", "Valencia", "Ghent", "Bergen", "Krakow", "Bologna",
          "Edinburgh", "Ljubljana", "Seville", "Rotterdam", "Gdansk", "Nantes", "Graz", "Aarhus",
          "Cork", "Lyon", "Turin", "Utrecht"]
PETS = ["Biscuit", "Pepper", "Juniper", "Waffles", "Pickle", "Mochi", "Clementine", "Bramble",
        "Noodle", "Ziggy", "Pretzel", "Marmalade"]
STREETS = ["Alder Road", "Quarry Lane", "Fenwick Street", "Mill Road", "Harbour Row",
           "Bexley Avenue", "Tanner Street", "Orchard Way", "Kestrel Close", "Wharf Street"]
ALLERGENS = ["sesame", "shellfish", "hazelnuts", "kiwi", "mustard", "celery", "lupin"]
RESTAURANTS = ["Tamarind House", "The Copper Pot", "Little Saigon Kitchen", "Osteria Verde",
               "Bao Brothers", "Casa Lumbre", "The Salt Shed", "Nori Bar", "Saffron Street",
               "The Gilded Spoon"]
DEPTS = ["data engineering", "customer support", "platform security", "mobile apps",
         "payments", "growth analytics", "site reliability"]
CARS = [("Skoda", "Octavia"), ("Toyota", "Corolla"), ("Mazda", "CX-30"), ("Volvo", "V60"),
        ("Honda", "Jazz"), ("Kia", "Niro"), ("Renault", "Clio"), ("Subaru", "Outback")]
COLOURS = ["grey", "dark green", "white", "navy blue", "silver", "red"]
BOOKS = ["The Remains of the Day", "Piranesi", "A Gentleman in Moscow", "Klara and the Sun",
         "The Overstory", "Station Eleven", "Middlemarch", "Demon Copperhead", "Stoner",
         "The Left Hand of Darkness"]
SCHOOLS = ["Hillcrest Primary", "St Aidan's", "Riverside Academy", "Elmwood School",
           "Northgate Primary", "Larkfield School", "Beacon Hill School"]
COMPANIES = ["Fernbrook Analytics", "Halcyon Labs", "Marlow and Pike", "Quillsoft",
             "Brightwater Energy", "Tidewell", "Northstar Freight", "Copperleaf Health"]
BANDS = ["The Weather Station", "Low Tide Choir", "Neon Orchard", "The Paper Kites",
         "Glass Animals", "Haunt the House"]
AIRLINES = [("TAP", "TP"), ("KLM", "KL"), ("Lufthansa", "LH"), ("Aer Lingus", "EI"),
            ("Vueling", "VY"), ("SAS", "SK"), ("easyJet", "U2")]
PROJECTS = ["invoice automation", "data retention", "office move", "onboarding revamp",
            "supplier audit", "pricing experiment"]
ACTIVITIES = [
    ("a couch-to-5k running plan", "the couch-to-5k plan"),
    ("Spanish lessons on Tuesday evenings", "Spanish lessons"),
    ("a pottery class at the community centre", "a pottery class"),
    ("physio exercises for my knee", "physio exercises"),
    ("a no-sugar month", "a no-sugar month"),
    ("piano lessons with a teacher down the road", "piano lessons"),
    ("bouldering at the climbing gym", "bouldering"),
    ("a sourdough starter, fed twice a day", "a sourdough starter"),
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FOODS = ["lentil soup", "a mushroom risotto", "fish tacos", "a chickpea curry", "shakshuka",
         "roast vegetables", "a big pot of chilli", "pad thai", "a leek and potato pie"]
HOBBIES = ["the garden", "my watercolours", "the jigsaw", "the guitar", "chess online",
           "the allotment", "my bird-watching list", "the model railway"]
SHOWS = ["the new detective series", "that baking competition", "a documentary about octopuses",
         "the space drama everyone talks about", "an old sitcom", "a cooking show from Japan"]


def _cast(rng: random.Random) -> dict[str, str]:
    """The people, places and numbers of one conversation (all distinct where it matters)."""
    women, men, surnames = rng.sample(WOMEN, 5), rng.sample(MEN, 5), rng.sample(SURNAMES, 5)
    cities = rng.sample(CITIES, 6)
    make, model = rng.choice(CARS)
    other_make = rng.choice([m for m, _ in CARS if m != make])
    airline, code = rng.choice(AIRLINES)
    restaurants = rng.sample(RESTAURANTS, 3)
    streets = rng.sample(STREETS, 3)
    month = rng.randint(5, 11)
    day = rng.randint(2, 28)
    pe_month = rng.randint(2, 6)
    return {
        "sister": women[0], "colleague": women[1], "friend": women[2], "mum": women[3],
        "neighbour": women[4], "kid": men[0], "brother": men[1], "boss": men[2],
        "plumber": f"{men[3]} {surnames[0]}", "landlord": f"{men[4]} {surnames[1]}",
        "teacher": f"Mr {surnames[2]}", "vet": f"Dr {surnames[3]}",
        "sister_city": cities[0], "old_city": cities[1], "race_city": cities[2],
        "vet_town": cities[3], "trip_city": cities[4], "other_city": cities[5],
        "pet": rng.choice(PETS), "code": str(rng.randint(1000, 9999)),
        "street": streets[0], "street2": streets[1], "street3": streets[2],
        "locker": str(rng.randint(12, 240)), "allergen": rng.choice(ALLERGENS),
        "restaurant": restaurants[0], "restaurant2": restaurants[1], "restaurant3": restaurants[2],
        "dept": rng.choice(DEPTS), "make": make, "model": model, "other_make": other_make,
        "colour": rng.choice(COLOURS), "book": rng.choice(BOOKS), "school": rng.choice(SCHOOLS),
        "rate": f"{rng.randint(45, 95)} pounds",
        "budget": f"{rng.randint(9, 31)},{rng.choice(['000', '500'])} pounds",
        "run_time": f"{rng.randint(44, 61)}:{rng.randint(0, 59):02d}",
        "anniv": f"{calendar.month_name[month]} {day}",
        "airline": airline, "flight": f"{code} {rng.randint(100, 1999)}",
        "pe_date": (f"{WEEKDAYS[rng.randint(0, 4)]} {calendar.month_name[pe_month]} "
                    f"{rng.randint(3, 27)}"),
        "company": rng.choice(COMPANIES), "band": rng.choice(BANDS),
        "project": rng.choice(PROJECTS), "n": str(rng.randint(3, 12)),
    }


# ------------------------------------------------------------------- planted facts
# name: (key entity, statements, acknowledgements, questions, answer, distractors)
# Statements are said by the user; acknowledgements never repeat the answer, so the
# statement is the one evidence turn. Distractors mention the key entity without the fact;
# those marked "<" are said before the fact (they would contradict it afterwards).
FACTS: dict[str, tuple[str, list[str], list[str], list[str], str, list[str]]] = {
    "sister_city": (
        "{sister}",
        [("Big family news: my sister {sister} has moved to {sister_city}. She signed the lease "
          "on a flat near the river last week and sounds so happy."),
         ("So {sister} did it, she packed up everything and moved to {sister_city}! My sister, "
          "the one who never leaves home, living abroad.")],
        ["That's wonderful news. Moving is exhausting though, is she settling in all right?",
         "Good for her! A fresh start can be exactly what someone needs."],
        ["Which city is {sister} living in these days?",
         "Where did {sister} end up relocating to?"],
        "{sister_city}",
        ["<{sister} is still in {old_city} for now, and she hates the commute there.",
         "{sister} called to ask for my lasagne recipe, we ended up talking for an hour.",
         "Need to get {sister} something for her birthday. She likes fancy tea and notebooks."],
    ),
    "storage_code": (
        "storage unit",
        [("Writing this down so I don't forget it again: the keypad code for the storage unit "
          "on {street} is {code}."),
         "Note for later: storage unit on {street}, the door code is {code}. I keep forgetting."],
        ["Got it, I'll keep that safe for you.",
         "Noted. Handy to have it somewhere other than a sticky note."],
        ["What's the number I need to punch in to open my storage place?",
         "Remind me of the keypad digits for where I keep my boxes?"],
        "{code}",
        ["The storage unit is getting full, mostly boxes of old books and a broken lamp.",
         "Should I give up the storage unit? It costs more every year and I barely go there."],
    ),
    "pet": (
        "beagle",
        [("We adopted a beagle from the shelter on Saturday! The kids named him {pet} and he "
          "has already eaten a sock."),
         ("Introducing the newest member of the family: a three-year-old beagle called {pet}, "
          "from the rescue centre.")],
        ["Congratulations! Rescue dogs are the best. Does he get on with the kids?",
         "Oh, lovely. The first weeks are a big adjustment for a rescue, go gently."],
        ["What name did the kids give our new dog?",
         "What do we call the dog we got from the shelter?"],
        "{pet}",
        ["The neighbour's beagle barked all night again, I barely slept.",
         "Is a beagle a good breed for a flat? Asking for a friend, sort of."],
    ),
    "allergy": (
        "allergy",
        [("Got the allergy test results back: it's {allergen}. The doctor said to avoid it "
          "completely, which explains years of feeling rotten after dinners out.")],
        ["That's useful to finally know. Reading labels gets easier after the first few weeks.",
         "At least there's an answer now. Restaurants are usually good about it if you ask."],
        ["Which food did the test show I react badly to?",
         "What did the doctor say I must stay away from eating?"],
        "{allergen}",
        ["<Thinking of asking for an allergy test, my eyes itch after meals out.",
         "Hay fever season is starting, my allergy tablets are nearly gone."],
    ),
    "promotion": (
        "{colleague}",
        [("{colleague} got promoted! She's now running the {dept} team, and honestly it's well "
          "deserved after the year she's had.")],
        ["Good news for her, and probably for you too if you work with her a lot.",
         "That's great. Promotions from inside usually go down well with a team."],
        ["Which team does {colleague} head up now?",
         "What group is {colleague} in charge of since her move up?"],
        "{dept}",
        ["{colleague} and I grabbed lunch today, she recommended a podcast about city planning.",
         "{colleague} was out sick so the stand-up was short and weirdly quiet."],
    ),
    "car": (
        "{model}",
        [("We did it, we bought a car: a used {colour} {make} {model} with 60,000 km on it. The "
          "dealer threw in winter tyres.")],
        ["Congratulations on the new wheels! Worth getting it checked over in the first month.",
         "Nice. Second-hand is usually the sensible choice."],
        ["What make and model of vehicle did we end up getting?",
         "Which car did we go for in the end?"],
        "{make} {model}",
        ["<Test drove a {other_make} today, but the boot was too small for the pram.",
         "Is the {model} a sensible family car? Everyone round here seems to have one.",
         "Car prices are absurd at the moment, even for old models."],
    ),
    "locker": (
        "locker",
        [("I finally rented a locker at the gym, it's number {locker}, right by the showers. No "
          "more carrying my bag to the office.")],
        ["That'll make early sessions much easier.", "Good call, that bag was getting heavy."],
        ["Which of the gym lockers is mine?",
         "What's the number on my locker at the fitness club?"],
        "{locker}",
        ["Someone left their locker open at the gym and their phone was just sitting there."],
    ),
    "book": (
        "Book club",
        ["Book club picked {book} for next month. I've heard it's slow to start but worth it."],
        ["That one comes up a lot. Let me know what you think once you're in.",
         "Nice pick. Are you reading it on paper or on the e-reader?"],
        ["What novel are we reading for the reading group?",
         "Which title did the book group choose to read next?"],
        "{book}",
        ["Book club ran late again, we spent an hour arguing about the ending.",
         "Skipping book club this week, I'm wiped out."],
    ),
    "teacher": (
        "{kid}",
        [("{kid}'s teacher this year is {teacher}. He seems strict but fair, and the kids "
          "apparently like him.")],
        ["Strict but fair is a good combination at that age.",
         "That's a good sign if the kids like him already."],
        ["Who's teaching {kid}'s class this year?",
         "Which teacher has {kid} got this school year?"],
        "{teacher}",
        ["{kid} lost another water bottle, that's the third one this term.",
         "{kid} wants to learn the drums. Please tell me it's a phase."],
    ),
    "plumber": (
        "{plumber}",
        ["The plumber, {plumber}, quoted {rate} an hour plus parts to fix the bathroom leak."],
        ["That sounds about normal for an emergency call-out.",
         "Worth asking whether parts come at cost or with a markup."],
        ["How much does {plumber} bill for an hour of work?",
         "What hourly price did {plumber} give me?"],
        "{rate}",
        ["{plumber} came back to check the pipes and says the boiler is on its last legs."],
    ),
    "kitchen": (
        "kitchen",
        [("We agreed on a hard cap of {budget} for the kitchen renovation. Not a penny more, "
          "whatever the builder says.")],
        ["A firm number up front makes the decisions much easier later.",
         "Sensible. Keep a small reserve for surprises behind the walls."],
        ["What spending limit did we set for redoing the kitchen?",
         "How much did we decide we'd spend at most on the new kitchen?"],
        "{budget}",
        ["The kitchen is a disaster zone, we're eating takeaway off the sofa.",
         "Choosing kitchen tiles is harder than choosing a house, I swear."],
    ),
    "run": (
        "10k",
        [("Ran the {race_city} 10k this morning in {run_time}! A personal best by almost two "
          "minutes, my legs are jelly.")],
        ["That's a big improvement, well done! Stretch and eat something proper.",
         "Brilliant. All that training paid off."],
        ["What was my finishing time in that ten kilometre race?",
         "How long did the 10k race in {race_city} take me?"],
        "{run_time}",
        ["<Signed up for a 10k in the spring, now I actually have to train.",
         "Half the office is doing the charity 10k in autumn, they keep asking me to join."],
    ),
    "anniversary": (
        "anniversary",
        [("Note to self: our wedding anniversary is on {anniv}. Ten years this time, so it has "
          "to be something special.")],
        ["Ten years! We can plan something nearer the time.",
         "Noted. Ten years deserves more than a card."],
        ["When is the date we got married, so I can plan the celebration?",
         "On what day does our anniversary fall?"],
        "{anniv}",
        ["Any ideas for a small anniversary present for my parents? They like gardening."],
    ),
    "landlord": (
        "landlord",
        [("The flat has a new landlord, {landlord}. He wants the rent by the 3rd of each month "
          "and prefers email to calls.")],
        ["Good to know early. Set up the transfer a few days before the 3rd.",
         "Email is easier anyway, you get a record of everything."],
        ["Who owns the flat now, what's his name?",
         "What's the name of the man I pay the rent to?"],
        "{landlord}",
        ["The old landlord never fixed the window, let's see if this one does."],
    ),
    "ramen": (
        "{restaurant}",
        [("{restaurant} on {street2} does the best ramen in town, better than what we had on "
          "holiday. The broth is unreal.")],
        ["High praise! Is it the kind of place where you have to queue?",
         "Noted for the next time you want noodles."],
        ["Where did I say you get the best bowl of noodle soup around here?",
         "Which place did I rate highest for ramen?"],
        "{restaurant}",
        ["{restaurant} was fully booked on Friday, so we ended up at a kebab place.",
         "{restaurant3} on {street2} closed for refurbishment, the whole street is scaffolding."],
    ),
}

# name: (first fact, second statements, the second's key, questions, answer, the first's key)
HOPS: dict[str, tuple[str, list[str], str, list[str], str, str]] = {
    "flight": (
        "sister_city",
        [("Booked the flights to {sister_city} for the long weekend in May: {airline} {flight}, "
          "leaving at 7:40 in the morning. Ouch.")],
        "{flight}",
        ["What's the flight number for my trip to see my sister?"],
        "{flight}", "{sister}",
    ),
    "signoff": (
        "promotion",
        [("My {project} proposal needs a sign-off from whoever heads {dept} now, so that's the "
          "next hurdle.")],
        "{project}",
        ["Whose signature do I need before the {project} plan can go ahead?"],
        "{colleague}", "{colleague}",
    ),
    "vet": (
        "pet",
        [("{pet} has his first check-up with {vet} at the {vet_town} clinic on Thursday. "
          "Fingers crossed he behaves.")],
        "{pet}",
        ["Which vet is looking after our beagle?"],
        "{vet}", "beagle",
    ),
    "curry": (
        "allergy",
        [("{restaurant2} is famous for its house curry, but they put {allergen} in pretty much "
          "everything they cook.")],
        "{restaurant2}",
        ["Given my test results, which restaurant should I steer clear of?"],
        "{restaurant2}", "allergy",
    ),
    "parents_evening": (
        "teacher",
        [("Got the class calendar from {teacher}: parents' evening is on {pe_date}, and he "
          "wants to talk about reading.")],
        "{teacher}",
        ["Which evening do I get to sit down with {kid}'s teacher?"],
        "{pe_date}", "{kid}",
    ),
}

# Dated events, each said on the day it happens: (statement, phrase for questions,
# short answer, a mention before it happened or None)
EVENTS: dict[str, tuple[str, str, str, str | None]] = {
    "passport": (("Finally picked up my renewed passport today. The photo is as bad as I "
                  "expected."), "collecting my new passport", "the passport",
                 "I really need to renew my passport before summer."),
    "bike": ("Bought a second-hand road bike this afternoon, a lovely old steel frame.",
             "buying the road bike", "the road bike",
             "Been browsing road bikes online again, they are so expensive."),
    "dentist": ("Just back from the dentist: two small fillings and a lecture about flossing.",
                "the dentist visit", "the dentist visit",
                "The dentist keeps sending reminders, I should book a check-up."),
    "tax": ("Submitted my tax return today, a whole week before the deadline for once.",
            "filing the tax return", "the tax return",
            "The tax return is looming and I have a shoebox of receipts to sort."),
    "interview": (("Had the final-round interview at {company} this morning. I think it went "
                   "well?"), "the last interview at {company}", "the {company} interview",
                  "{company} emailed about a final round, no date yet."),
    "concert": ("We saw {band} live tonight. Loud, sweaty, brilliant.",
                "the {band} gig", "the {band} concert",
                "{band} announced a tour, tickets will sell out fast."),
    "haircut": ("Got a proper haircut today, first one in months, I feel like a new person.",
                "getting my hair cut", "the haircut", None),
    "garage": ("Dropped the car at the garage today for its yearly service.",
               "the car's annual service", "the car service",
               "The car is making a rattling noise again, it needs a service."),
}
EVENT_ACKS = ["How did it go?", "Nice, one thing off the list.", "Glad that's done!",
              "Ha, sounds like quite a day.", "Good to hear. Anything else on today?"]

# --------------------------------------------------------------------------- chit-chat
# (user sentence, the assistant's answer to it) per topic; a chit-chat turn joins 1-4 of a topic.
TOPICS: dict[str, list[tuple[str, str]]] = {
    "work": [
        ("Long day. The {project} meeting ran over by forty minutes again.",
         "Forty-minute overruns usually mean the agenda is too long; suggest a hard stop."),
        ("{boss} wants the quarterly numbers by Friday, which means my weekend is gone.",
         "Block an hour on Friday morning for the numbers, before anything else can claim it."),
        ("I spent the whole morning in spreadsheets and I can't feel my brain.",
         "A short walk away from the screen helps more than you'd think."),
        ("We have a new intern who asks brilliant questions, it's making me rethink things.",
         "Good questions from a newcomer are a gift, they show where the docs are thin."),
        ("Can you help me word an email that says no without sounding rude?",
         ("Something like: thanks for thinking of me, I can't take this on this month, but I "
          "could look at it in the next cycle.")),
        ("{colleague} and I are pairing on the {project} work this week.",
         "Pairing is slow on day one and fast by day three, in my experience."),
        ("The office coffee machine broke and morale has collapsed.",
         "A team whip-round for a decent cafetiere would be a heroic act."),
        ("I have {n} meetings tomorrow, back to back, no lunch break.",
         "That sounds draining. Is any of it movable to later in the week?"),
        ("{boss} asked me to present the {project} results to the whole department.",
         "Lead with the one number that matters, then the story of how you got there."),
    ],
    "food": [
        ("Made {food} for dinner and it was actually good, for once.",
         "Nice! Write down what you did differently while you still remember."),
        ("What can I cook tonight with leeks, eggs and half a bag of spinach?",
         ("A frittata would use all of it: soften the leeks, wilt the spinach, pour over the "
          "beaten eggs and finish it under the grill.")),
        ("I'm trying to eat less meat during the week. Any easy ideas?",
         ("Lentils, chickpeas and beans go a long way; {food} makes a good batch for two "
          "dinners.")),
        ("We ordered pizza again, third time this week, no regrets.",
         "No regrets is the right attitude. Maybe a salad on the side next time."),
        ("Tried a new bakery near {street3}, the cinnamon buns are dangerous.",
         "Dangerous bakeries are the best kind of dangerous."),
        ("I burnt the rice. How do you even burn rice?",
         ("Too much heat and not enough water; keep the lid on and turn it right down after it "
          "boils.")),
        ("Lunch at the office canteen was grey soup again.",
         "Maybe bring leftovers a couple of days a week, cook once, eat twice."),
    ],
    "travel": [
        ("Thinking about a weekend in {trip_city} in the autumn. Worth it?",
         ("{trip_city} is lovely in autumn, fewer crowds and softer light; two nights is enough "
          "for the old town.")),
        ("The train to {other_city} was delayed two hours, I read half a book.",
         "At least you got the reading done. Claim the delay refund, it's usually quick."),
        ("Do you think I need travel insurance for a three-day trip?",
         "For a short trip, check what your bank card already covers before buying a policy."),
        ("I want a holiday where I do absolutely nothing. Is that a thing?",
         "It is, and it's underrated: pick somewhere with a beach or a pool and no plans."),
        ("Packing tips for a week with only hand luggage, please.",
         "Roll clothes, wear the bulkiest shoes, and plan outfits around two colours."),
        ("My friend {friend} just got back from {trip_city} and won't stop talking about it.",
         "Ask her for the two places she'd go back to; that beats any guidebook."),
    ],
    "health": [
        ("Slept badly again, woke up at 4 and couldn't get back to sleep.",
         ("Keep the room cool and dark, and get up for twenty minutes if you can't sleep; it "
          "resets things better than lying there.")),
        ("My back is stiff from sitting all day. Any stretches?",
         "Try cat-cow, a hip-flexor lunge and a gentle twist, a minute each, twice a day."),
        ("I've been drinking way too much coffee, maybe five cups a day.",
         "Cutting down one cup at a time avoids the headaches."),
        ("Went for a swim at lunch and felt great afterwards.",
         "Swimming at lunch is a great habit if you can keep it."),
        ("I've got a cold coming, my throat is scratchy.",
         "Rest, fluids and honey in hot water; if it drags on past a week, see someone."),
        ("Walked {n} kilometres today without noticing, the weather was too nice to stop.",
         "Those are the best walks, the ones that don't feel like exercise."),
    ],
    "family": [
        ("{mum} is coming to stay for the weekend, I need to clean the whole flat.",
         "Focus on the rooms she'll see; nobody inspects the cupboards."),
        ("{kid} asked me today where the sky ends. I had no good answer.",
         "\"Nobody knows exactly, let's look it up together\" is a great answer at that age."),
        ("My brother {brother} is thinking about going back to university.",
         "Going back later often works better, people know what they want by then."),
        ("Family dinner on Sunday, {n} people, and one of them is vegan.",
         "A big vegetable tagine or a bean chilli keeps everyone happy."),
        ("{sister} sent a video of her cooking disaster, I laughed so much.",
         "The best family videos are the disasters."),
        ("{kid} has a school trip next week and needs a packed lunch every day.",
         "Wraps, fruit and something crunchy; make them the night before."),
    ],
    "hobbies": [
        ("Spent the afternoon on {hobby}, it's the only thing that switches my brain off.",
         "Good to have something like that, hold on to it."),
        ("Watched {show} last night. Surprisingly good.",
         "I've heard good things about that one; the second season is meant to be better."),
        ("I want a hobby that doesn't involve a screen. Ideas?",
         "Anything with your hands works: sketching, bread, a jigsaw, repairing something."),
        ("My friend {friend} is trying to get me into board games.",
         "Board games are great once you find the right group; start with short co-op ones."),
        ("Went to a pub quiz with {friend}, we came fourth out of twelve.",
         "Fourth out of twelve is respectable; the winners are always suspiciously good."),
        ("Thinking of picking up {hobby} again after years away.",
         "Start small and give it fifteen minutes a day, the old skills come back quickly."),
    ],
    "plans": [
        ("Weekend plan: sleep, market, long walk, nothing else.",
         "That's a lovely weekend, honestly."),
        ("Remind me I should call the bank on Monday about the card.",
         "I'll remind you. Have your card number and the last transactions ready."),
        ("I should sort out my desk drawers, they're a crime scene.",
         "Ten minutes a day on the drawers and they're done by Friday."),
        ("Next month is packed: two birthdays, a wedding and a work trip.",
         "Put the fixed dates in the calendar now and leave the gaps free."),
        ("What should I do first, laundry or the shopping?",
         "Shopping first, then the laundry can run while you put things away."),
        ("{friend} wants to do a day trip to {other_city} on Saturday.",
         "An early train and a loose plan make the best day trips."),
    ],
    "money": [
        ("The electricity bill came in at {n}0 pounds more than last month.",
         "Check whether it was an estimated reading; a photo of the meter often fixes it."),
        ("Trying to save {n}00 pounds a month for a holiday fund.",
         "Set the transfer up the day after payday so it happens before you notice."),
        ("Is it silly to pay for three streaming services?",
         "Keep the one you use most and rotate the others month by month."),
        ("Spent way too much at the garden centre. Plants are expensive!",
         "Plants are an investment in your mood, that's my official position."),
        ("Should I pay off the credit card first or put money into savings?",
         "Usually the card first: its interest is almost always higher than what savings pay."),
        ("The council tax went up again, {n} percent this year.",
         "Worth checking whether you qualify for any discount; people often miss them."),
    ],
}
SMALL_TALK = ["Morning!", "Hi again.", "Evening. Quick one.", "Back again, hello.",
              "Hey, got a minute?", "Hello hello."]
FOLLOW_UPS = ["Anything else on your mind today?", "Let me know how it goes.",
              "Want me to keep a note of that?", "How are you feeling about it overall?",
              "Shall I remind you about it later in the week?", "Fingers crossed for you."]
SHORT = ["Ha, true.", "Thanks, that helps.", "Makes sense.", "OK, will do.", "Fair enough.",
         "Good point.", "Right, thanks!", "I'll try that."]


def _fill(text: str, cast: dict[str, str]) -> str:
    return text.format(**cast)


def _chat_pair(rng: random.Random, cast: dict[str, str]) -> tuple[str, str]:
    """One user turn about a random topic and the assistant's reply, of varied length."""
    pairs = TOPICS[rng.choice(list(TOPICS))]
    slots = {**cast, "food": rng.choice(FOODS), "hobby": rng.choice(HOBBIES),
             "show": rng.choice(SHOWS)}
    k = rng.choices((1, 2, 3, 4), weights=(2, 3, 3, 2))[0]
    chosen = rng.sample(pairs, k)
    user = " ".join(u.format(**slots) for u, _ in chosen)
    reply = " ".join(r.format(**slots) for _, r in chosen)
    if rng.random() < 0.1:  # a short reaction instead, answered all the same
        user = rng.choice(SHORT)
    if rng.random() < 0.1:
        user = f"{rng.choice(SMALL_TALK)} {user}"
    if rng.random() < 0.4:
        reply = f"{reply} {rng.choice(FOLLOW_UPS).format(**slots)}"
    return user, reply


# --------------------------------------------------------------------------- layout
@dataclass
class _Pair:
    """A user turn and the assistant's reply, with the planted item it carries, if any."""

    user: str
    reply: str
    tag: str | None = None  # planted item whose evidence is the user turn


def _tokens(text: str) -> int:
    from optical_memory.tokens import default_counter

    return default_counter().count(text)


def _make_one(seed: int, k: int) -> Conversation:
    rng = random.Random(f"optical-memory recall {seed} {k}")
    cast = _cast(rng)
    n_sessions = rng.randint(20, 34)
    days = [0]
    for _ in range(n_sessions - 1):
        days.append(days[-1] + rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 6, 8)))
    first_day = START + timedelta(days=rng.randint(0, 60))
    starts = [
        first_day + timedelta(days=d, hours=rng.randint(7, 21), minutes=rng.randint(0, 59))
        for d in days
    ]
    sessions: list[list[_Pair]] = [[] for _ in range(n_sessions)]
    used: set[int] = set()

    def place(pair: _Pair, lo: int = 0, hi: int | None = None, exclusive: bool = False) -> int:
        hi = n_sessions - 1 if hi is None else hi
        choices = [s for s in range(lo, hi + 1) if not (exclusive and s in used)]
        s = rng.choice(choices or list(range(lo, hi + 1)))
        if exclusive:
            used.add(s)
        sessions[s].append(pair)
        return s

    # facts: some as single-hop questions, some as the first hop of a two-hop question
    hops = rng.sample(sorted(HOPS), rng.randint(3, 4))
    firsts = {HOPS[h][0] for h in hops}
    singles = rng.sample([f for f in sorted(FACTS) if f not in firsts], rng.randint(8, 10))
    fact_session: dict[str, int] = {}
    questions: list[tuple[str, str, tuple[str, ...], str, tuple[str, ...]]] = []
    for name in sorted({*singles, *firsts}):
        _, says, acks, _, _, distract = FACTS[name]
        hi = n_sessions - 2 if name in firsts else None  # the second hop comes in a later session
        s = place(_Pair(_fill(rng.choice(says), cast), rng.choice(acks), f"fact:{name}"), 0, hi)
        fact_session[name] = s
        for d in distract:
            if d.startswith("<"):
                if s > 0:
                    place(_Pair(_fill(d[1:], cast), _chat_pair(rng, cast)[1]), 0, s - 1)
            else:
                place(_Pair(_fill(d, cast), _chat_pair(rng, cast)[1]))
    for name in singles:
        key, _, _, asks, answer, _ = FACTS[name]
        questions.append(("fact", _fill(rng.choice(asks), cast), (f"fact:{name}",),
                          _fill(answer, cast), (_fill(key, cast),)))
    for name in hops:
        first, says, key, asks, answer, first_key = HOPS[name]
        s0 = fact_session[first]
        place(_Pair(_fill(rng.choice(says), cast), rng.choice(EVENT_ACKS), f"hop:{name}"),
              s0 + 1)
        questions.append(("multi-hop", _fill(rng.choice(asks), cast),
                          (f"fact:{first}", f"hop:{name}"), _fill(answer, cast),
                          (_fill(first_key, cast), _fill(key, cast))))

    # dated events, one per session, for the temporal questions
    events = rng.sample(sorted(EVENTS), 6)
    event_session: dict[str, int] = {}
    for name in events[:5]:
        said, _, _, before = EVENTS[name]
        s = place(_Pair(_fill(said, cast), rng.choice(EVENT_ACKS), f"event:{name}"),
                  1, n_sessions - 1, exclusive=True)
        event_session[name] = s
        if before:
            place(_Pair(_fill(before, cast), _chat_pair(rng, cast)[1]), 0, s - 1)
    phrase = {e: _fill(EVENTS[e][1], cast) for e in events}
    short = {e: _fill(EVENTS[e][2], cast) for e in events}
    a, b = events[0], events[1]
    earlier = min((a, b), key=lambda e: event_session[e])
    pair = (a, b) if rng.random() < 0.5 else (b, a)
    questions.append((
        "temporal", f"Which happened earlier, {phrase[pair[0]]} or {phrase[pair[1]]}?",
        (f"event:{a}", f"event:{b}"), short[earlier], (),
    ))
    c, d = events[2], events[3]
    gap = abs((starts[event_session[c]].date() - starts[event_session[d]].date()).days)
    questions.append((
        "temporal", f"How many days were there between {phrase[c]} and {phrase[d]}?",
        (f"event:{c}", f"event:{d}"), str(gap), (),
    ))
    e = events[4]
    questions.append(("temporal", f"What was the date of {phrase[e]}?", (f"event:{e}",),
                      _date(starts[event_session[e]]), ()))
    # "about a week after": an activity begun 5-12 days after an event, another begun before it
    anchor = events[5]
    said = _fill(EVENTS[anchor][0], cast)
    acts = rng.sample(ACTIVITIES, 2)
    free = [s for s in range(1, n_sessions - 1) if s not in used]
    for s in rng.sample(free, len(free)):
        later = [t for t in range(s + 1, n_sessions)
                 if 5 <= (starts[t].date() - starts[s].date()).days <= 12]
        if later and later[0] not in used:
            sessions[s].append(_Pair(said, rng.choice(EVENT_ACKS), f"event:{anchor}"))
            sessions[later[0]].append(_Pair(
                f"Started {acts[0][0]} today. Wish me luck.", rng.choice(EVENT_ACKS), "act:0"))
            used.update((s, later[0]))
            place(_Pair(f"Started {acts[1][0]} today. Let's see if it sticks.",
                        rng.choice(EVENT_ACKS)), 0, s - 1)
            questions.append((
                "temporal", f"What did I begin about a week after {phrase[anchor]}?",
                (f"event:{anchor}", "act:0"), acts[0][1], (),
            ))
            break

    # chit-chat around the planted turns, to the conversation's length in turns and tokens
    target_turns = rng.randint(TURNS[0] + 20, TURNS[1] - 60) // 2
    planted = sum(len(s) for s in sessions)
    for _ in range(max(0, target_turns - planted)):
        s = rng.randrange(n_sessions)
        sessions[s].append(_Pair(*_chat_pair(rng, cast)))
    for s in sessions:
        rng.shuffle(s)
    _fit_tokens(rng, sessions, cast, rng.randint(TOKENS[0] + 1000, TOKENS[1] - 1000))
    messages, where = _stamp(rng, sessions, starts)
    out = []
    for kind, text, tags, answer, keys in questions:
        evidence = tuple(where[t] for t in tags)
        order = sorted(range(len(evidence)), key=lambda i: evidence[i])
        out.append(Question(text, kind, tuple(evidence[i] for i in order), answer,
                            tuple(keys[i] for i in order) if keys else ()))
    return Conversation(f"recall-{seed}-{k:02d}", messages, out)


def _fit_tokens(
    rng: random.Random, sessions: list[list[_Pair]], cast: dict[str, str], target: int
) -> None:
    """Add or drop chit-chat pairs until the turn content holds about `target` tokens (within
    TOKENS and TURNS)."""
    lo, hi = target - 400, target + 400
    total = sum(_tokens(p.user) + _tokens(p.reply) for s in sessions for p in s)
    turns = 2 * sum(len(s) for s in sessions)
    while total < lo and turns < TURNS[1] - 2:
        s = rng.randrange(len(sessions))
        pair = _Pair(*_chat_pair(rng, cast))
        sessions[s].insert(rng.randint(0, len(sessions[s])), pair)
        total += _tokens(pair.user) + _tokens(pair.reply)
        turns += 2
    while total > hi and turns > TURNS[0] + 2:
        fillers = [(i, j) for i, s in enumerate(sessions) for j, p in enumerate(s)
                   if p.tag is None and len(s) > 2]
        i, j = rng.choice(fillers)
        pair = sessions[i].pop(j)
        total -= _tokens(pair.user) + _tokens(pair.reply)
        turns -= 2


def _stamp(
    rng: random.Random, sessions: list[list[_Pair]], starts: list[datetime]
) -> tuple[list[dict], dict[str, int]]:
    """The messages with their creation times, and the index of each tagged user turn."""
    messages = [{"role": "system", "content": SYSTEM, "created_at": starts[0].timestamp() - 60}]
    where: dict[str, int] = {}
    for pairs, start in zip(sessions, starts):
        t = start.timestamp()
        for pair in pairs:
            if pair.tag:
                where[pair.tag] = len(messages)
            messages.append({"role": "user", "content": pair.user, "created_at": t})
            t += rng.randint(5, 40)
            messages.append({"role": "assistant", "content": pair.reply, "created_at": t})
            t += rng.randint(30, 600)
    return messages, where


def _date(when: datetime) -> str:
    return f"{calendar.month_name[when.month]} {when.day}"


def make_conversations(n: int = 8, seed: int = 0) -> list[Conversation]:
    """`n` conversations with their questions; the same for the same `seed`."""
    return [_make_one(seed, k) for k in range(n)]


def main() -> None:
    """Print a summary of each conversation and the questions of the first."""
    import argparse

    ap = argparse.ArgumentParser(description="Summarise the recall benchmark's conversations")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    conversations = make_conversations(args.n, args.seed)
    for conv in conversations:
        tokens = sum(_tokens(m["content"]) for m in conv.messages[1:])
        days = (conv.messages[-1]["created_at"] - conv.messages[0]["created_at"]) / 86400
        kinds = {k: sum(q.kind == k for q in conv.questions)
                 for k in ("fact", "multi-hop", "temporal")}
        print(f"{conv.session_id}: {len(conv.messages) - 1} turns, {tokens:,} tokens, "
              f"{days:.0f} days, questions {kinds}")
    for q in conversations[0].questions if conversations else []:
        print(f"  [{q.kind}] {q.text} -> {q.answer} (turns {list(q.evidence)})")


if __name__ == "__main__":
    main()
