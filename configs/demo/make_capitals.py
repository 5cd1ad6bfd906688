"""Writes the demo's dataset: capital-city questions about 148 countries, split into train and held-out.

Each row is {"question", "answer"} where `answer` is a regular expression accepting the city alone (with common
spellings), so the reward measures both the teacher's behaviour (the city only, no sentence) and correctness.
capitals-eval-format.jsonl asks the held-out questions again but scores only the form of the answer (a bare city
name), so the demo can show the behaviour the student learnt apart from what the model knows.
Rerun it to regenerate the three files (deterministic).
"""

import json
import random
import re
from pathlib import Path

CAPITALS = {
    "Afghanistan": ["Kabul"], "Algeria": ["Algiers"], "Argentina": ["Buenos Aires"], "Australia": ["Canberra"],
    "Austria": ["Vienna", "Wien"], "Bangladesh": ["Dhaka"], "Belgium": ["Brussels"], "Brazil": ["Brasilia", "Brasília"],
    "Bulgaria": ["Sofia"], "Cambodia": ["Phnom Penh"], "Canada": ["Ottawa"], "Chile": ["Santiago"],
    "China": ["Beijing"], "Colombia": ["Bogota", "Bogotá"], "Croatia": ["Zagreb"], "Czech Republic": ["Prague"],
    "Denmark": ["Copenhagen"], "Ecuador": ["Quito"], "Egypt": ["Cairo"], "Ethiopia": ["Addis Ababa"],
    "Finland": ["Helsinki"], "France": ["Paris"], "Germany": ["Berlin"], "Ghana": ["Accra"], "Greece": ["Athens"],
    "Hungary": ["Budapest"], "Iceland": ["Reykjavik", "Reykjavík"], "India": ["New Delhi", "Delhi"],
    "Indonesia": ["Jakarta"], "Iran": ["Tehran"], "Iraq": ["Baghdad"], "Ireland": ["Dublin"],
    "Israel": ["Jerusalem"], "Italy": ["Rome"], "Jamaica": ["Kingston"], "Japan": ["Tokyo"], "Jordan": ["Amman"],
    "Kuwait": ["Kuwait City"], "Lebanon": ["Beirut"], "Malaysia": ["Kuala Lumpur"], "Mexico": ["Mexico City"],
    "Mongolia": ["Ulaanbaatar", "Ulan Bator"], "Morocco": ["Rabat"], "Nepal": ["Kathmandu"],
    "Netherlands": ["Amsterdam"], "New Zealand": ["Wellington"], "Nigeria": ["Abuja"], "North Korea": ["Pyongyang"],
    "Norway": ["Oslo"], "Pakistan": ["Islamabad"], "Philippines": ["Manila"], "Poland": ["Warsaw"],
    "Portugal": ["Lisbon"], "Qatar": ["Doha"], "Romania": ["Bucharest"], "Russia": ["Moscow"],
    "Saudi Arabia": ["Riyadh"], "Senegal": ["Dakar"], "Serbia": ["Belgrade"], "Singapore": ["Singapore"],
    "South Africa": ["Pretoria"], "South Korea": ["Seoul"], "Spain": ["Madrid"], "Sri Lanka": ["Colombo", "Sri Jayawardenepura Kotte"],
    "Sudan": ["Khartoum"], "Sweden": ["Stockholm"], "Switzerland": ["Bern", "Berne"], "Syria": ["Damascus"],
    "Taiwan": ["Taipei"], "Thailand": ["Bangkok"], "Tunisia": ["Tunis"], "Turkey": ["Ankara"], "Uganda": ["Kampala"],
    "Ukraine": ["Kyiv", "Kiev"], "United Arab Emirates": ["Abu Dhabi"], "United Kingdom": ["London"],
    "United States": ["Washington", "Washington D.C.", "Washington, D.C.", "Washington DC"], "Uruguay": ["Montevideo"],
    "Venezuela": ["Caracas"], "Vietnam": ["Hanoi"], "Zimbabwe": ["Harare"], "Zambia": ["Lusaka"],
    "Albania": ["Tirana"], "Andorra": ["Andorra la Vella"], "Angola": ["Luanda"], "Armenia": ["Yerevan"],
    "Azerbaijan": ["Baku"], "Bahamas": ["Nassau"], "Bahrain": ["Manama"], "Barbados": ["Bridgetown"],
    "Belarus": ["Minsk"], "Belize": ["Belmopan"], "Benin": ["Porto-Novo", "Porto Novo"], "Bhutan": ["Thimphu"],
    "Bolivia": ["Sucre", "La Paz"], "Botswana": ["Gaborone"], "Burundi": ["Gitega"], "Cameroon": ["Yaounde", "Yaoundé"],
    "Chad": ["N'Djamena", "Ndjamena"], "Costa Rica": ["San Jose", "San José"], "Cyprus": ["Nicosia"],
    "Djibouti": ["Djibouti"], "Dominican Republic": ["Santo Domingo"], "El Salvador": ["San Salvador"],
    "Eritrea": ["Asmara"], "Estonia": ["Tallinn"], "Fiji": ["Suva"], "Gabon": ["Libreville"], "Georgia": ["Tbilisi"],
    "Guatemala": ["Guatemala City"], "Guinea": ["Conakry"], "Guyana": ["Georgetown"], "Haiti": ["Port-au-Prince"],
    "Honduras": ["Tegucigalpa"], "Kazakhstan": ["Astana"], "Kyrgyzstan": ["Bishkek"], "Laos": ["Vientiane"],
    "Latvia": ["Riga"], "Liberia": ["Monrovia"], "Libya": ["Tripoli"], "Lithuania": ["Vilnius"],
    "Luxembourg": ["Luxembourg"], "Madagascar": ["Antananarivo"], "Malawi": ["Lilongwe"], "Mali": ["Bamako"],
    "Malta": ["Valletta"], "Mauritania": ["Nouakchott"], "Moldova": ["Chisinau", "Chișinău"], "Monaco": ["Monaco"],
    "Montenegro": ["Podgorica"], "Mozambique": ["Maputo"], "Namibia": ["Windhoek"], "Nicaragua": ["Managua"],
    "Niger": ["Niamey"], "Oman": ["Muscat"], "Panama": ["Panama City"], "Paraguay": ["Asuncion", "Asunción"],
    "Rwanda": ["Kigali"], "Slovakia": ["Bratislava"], "Slovenia": ["Ljubljana"], "Somalia": ["Mogadishu"],
    "Suriname": ["Paramaribo"], "Tajikistan": ["Dushanbe"], "Tanzania": ["Dodoma"], "Togo": ["Lome", "Lomé"],
    "Turkmenistan": ["Ashgabat"], "Uzbekistan": ["Tashkent"], "Yemen": ["Sanaa", "Sana'a"],
}  # fmt: skip
# The teacher's worked examples (teacher_prompt.json) are kept out of both splits.
EXAMPLES = {"Peru", "Kenya", "Cuba"}
NUM_EVAL = 40
# The behaviour being distilled, scored apart from correctness: a bare city name (1-4 words, no sentence).
CITY_ONLY = r"^\s*[^\s!?]+(?:\s[^\s!?]+){0,3}\s*$"


def pattern(names: list[str]) -> str:
    return r"^\s*(?:" + "|".join(re.escape(n) for n in names) + r")\s*\.?\s*$"


def main() -> None:
    countries = sorted(set(CAPITALS) - EXAMPLES)
    random.Random(0).shuffle(countries)
    here = Path(__file__).parent
    for split, part in (("eval", countries[:NUM_EVAL]), ("train", countries[NUM_EVAL:])):
        with open(here / f"capitals-{split}.jsonl", "w") as f:
            for country in part:
                f.write(json.dumps({"question": f"What is the capital of {country}?", "answer": pattern(CAPITALS[country])}) + "\n")
        print(split, len(part))
    with open(here / "capitals-eval-format.jsonl", "w") as f:
        for country in countries[:NUM_EVAL]:
            f.write(json.dumps({"question": f"What is the capital of {country}?", "answer": CITY_ONLY}) + "\n")


if __name__ == "__main__":
    main()
