"""Write sample_data/train.jsonl and val.jsonl: small, varied, hand-written instruction data.

The records are our own text (no third-party data), short enough for a CPU demo, and mix
records with and without input, lists, arithmetic, rewriting, classification and code.
Run: python scripts/make_sample_data.py
"""

import json
import random
from pathlib import Path

RECORDS = [
    ("Name the capital of France.", "", "The capital of France is Paris."),
    ("Name the capital of Japan.", "", "The capital of Japan is Tokyo."),
    ("Name the capital of Canada.", "", "The capital of Canada is Ottawa."),
    ("Name the capital of Kenya.", "", "The capital of Kenya is Nairobi."),
    ("Name the capital of Australia.", "", "The capital of Australia is Canberra."),
    ("Name the capital of Brazil.", "", "The capital of Brazil is Brasília."),
    ("Translate the word into French.", "house", "maison"),
    ("Translate the word into French.", "water", "eau"),
    ("Translate the word into French.", "book", "livre"),
    ("Translate the word into Spanish.", "friend", "amigo"),
    ("Translate the word into Spanish.", "cat", "gato"),
    ("Translate the word into German.", "tree", "Baum"),
    ("Add the two numbers.", "12 and 30", "12 + 30 = 42."),
    ("Add the two numbers.", "7 and 8", "7 + 8 = 15."),
    ("Multiply the two numbers.", "6 and 7", "6 × 7 = 42."),
    ("Multiply the two numbers.", "9 and 11", "9 × 11 = 99."),
    ("Subtract the second number from the first.", "50 and 8", "50 − 8 = 42."),
    ("Is the number even or odd?", "17", "17 is odd."),
    ("Is the number even or odd?", "64", "64 is even."),
    ("Classify the sentiment of the review as positive or negative.", "The battery lasts all day and the screen is gorgeous.", "positive"),
    ("Classify the sentiment of the review as positive or negative.", "It broke after two days and support never answered.", "negative"),
    ("Classify the sentiment of the review as positive or negative.", "Fast delivery, works exactly as described.", "positive"),
    ("Classify the sentiment of the review as positive or negative.", "Too loud, too heavy, and the manual is useless.", "negative"),
    ("Write the plural of the noun.", "mouse", "mice"),
    ("Write the plural of the noun.", "child", "children"),
    ("Write the plural of the noun.", "box", "boxes"),
    ("Give the opposite of the word.", "ancient", "modern"),
    ("Give the opposite of the word.", "generous", "stingy"),
    ("Give the opposite of the word.", "expand", "contract"),
    ("Rewrite the sentence in the past tense.", "She walks to school.", "She walked to school."),
    ("Rewrite the sentence in the past tense.", "They build a bridge.", "They built a bridge."),
    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("List three primary colors.", "", "1. Red\n2. Blue\n3. Yellow"),
    ("List the first five prime numbers.", "", "2, 3, 5, 7, 11"),
    ("List three states of matter.", "", "Solid, liquid and gas."),
    ("Write a Python function that returns the square of a number.", "", "def square(x):\n    return x * x"),
    ("Write a Python expression that reverses a string s.", "", "s[::-1]"),
    ("Write a Python function that checks whether a number is even.", "", "def is_even(n):\n    return n % 2 == 0"),
    ("Convert the temperature from Celsius to Fahrenheit.", "100 °C", "100 °C is 212 °F."),
    ("Convert the temperature from Celsius to Fahrenheit.", "0 °C", "0 °C is 32 °F."),
    ("Summarize the text in one sentence.", "The library will close for renovation in May. During that month, books can be returned at the town hall, and the online catalogue stays available.", "The library closes for renovation in May, but returns go to the town hall and the online catalogue stays open."),
    ("Summarize the text in one sentence.", "Our team tested three batteries. The cheapest one died after four hours, the middle one after nine, and the most expensive lasted eleven hours.", "The more expensive the battery, the longer it lasted, from four to eleven hours."),
    ("Answer the question with yes or no.", "Is the Pacific the largest ocean on Earth?", "Yes."),
    ("Answer the question with yes or no.", "Do spiders have six legs?", "No."),
    ("Explain what a noun is in one sentence.", "", "A noun is a word that names a person, place, thing or idea."),
    ("Explain what photosynthesis is in one sentence.", "", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and oxygen."),
    ("Suggest a name for a bakery.", "", "The Rolling Pin."),
    ("Suggest a name for a pet goldfish.", "", "Bubbles."),
    ("Correct the spelling in the sentence.", "I recieved the pakage yesterday.", "I received the package yesterday."),
    ("Correct the spelling in the sentence.", "Their going to the libary.", "They're going to the library."),
    ("Count the words in the sentence.", "The quick brown fox jumps.", "There are 5 words."),
    ("Count the vowels in the word.", "banana", "There are 3 vowels."),
    ("Sort the numbers in ascending order.", "9, 2, 7, 4", "2, 4, 7, 9"),
    ("Sort the words alphabetically.", "pear, apple, fig", "apple, fig, pear"),
    ("Write a haiku about rain.", "", "Soft rain on the roof\nthe garden drinks in silence\nclouds drift out to sea"),
    ("Give a synonym for the word.", "happy", "joyful"),
    ("Give a synonym for the word.", "big", "large"),
    ("Name the chemical symbol of the element.", "gold", "Au"),
    ("Name the chemical symbol of the element.", "iron", "Fe"),
    ("Name the chemical symbol of the element.", "sodium", "Na"),
]


def main() -> None:
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in RECORDS]
    random.Random(7).shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "sample_data"
    out.mkdir(exist_ok=True)
    n_val = 12
    for name, part in (("val.jsonl", rows[:n_val]), ("train.jsonl", rows[n_val:])):
        with open(out / name, "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {out / name}: {len(part)} records")


if __name__ == "__main__":
    main()
