"""The routing benchmark's profiles: short texts a user might send as `profile`, each with its culture.

Written here by hand, not drawn from the libraries the router reads, so the benchmark measures them. Four
kinds of cue:
- `country`, `nationality`, `city`, `region`: the text names one (in English or in the country's language);
- `language`: no place, in a language spoken mostly in one surveyed country;
- `none`: English, no place, only what a person does or eats or celebrates (the embedding's case).
Every culture is one of the survey file's 107, so each has an expert or a committee.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    text: str
    culture: str
    cue: str  # country, nationality, city, region, language or none
    language: str  # ISO 639-1 of the text


JOBS = [
    "nurse",
    "teacher",
    "taxi driver",
    "farmer",
    "software developer",
    "retired miner",
    "shop owner",
    "university student",
    "police officer",
    "cook",
    "bank clerk",
    "fisherman",
]

# (culture, country as people write it, nationality, three cities or regions)
ENGLISH = [
    ("Germany", "Germany", "German", ["Hamburg", "Munich", "Bavaria"]),
    ("United States", "the United States", "American", ["Chicago", "Houston", "Ohio"]),
    ("United Kingdom", "the UK", "British", ["Manchester", "Glasgow", "Yorkshire"]),
    ("Nigeria", "Nigeria", "Nigerian", ["Lagos", "Ibadan", "Kano"]),
    ("Indonesia", "Indonesia", "Indonesian", ["Surabaya", "Jakarta", "Bali"]),
    ("Kenya", "Kenya", "Kenyan", ["Nairobi", "Mombasa", "Kisumu"]),
    ("Jordan", "Jordan", "Jordanian", ["Amman", "Zarqa", "Irbid"]),
    ("Russia", "Russia", "Russian", ["Novosibirsk", "Kazan", "Siberia"]),
    ("Brazil", "Brazil", "Brazilian", ["Recife", "Porto Alegre", "Bahia"]),
    ("Mexico", "Mexico", "Mexican", ["Guadalajara", "Monterrey", "Oaxaca"]),
    ("South Korea", "South Korea", "South Korean", ["Seoul", "Busan", "Daegu"]),
    ("Pakistan", "Pakistan", "Pakistani", ["Lahore", "Karachi", "Sindh"]),
    ("Canada", "Canada", "Canadian", ["Vancouver", "Calgary", "Ontario"]),
    ("Australia", "Australia", "Australian", ["Brisbane", "Adelaide", "Queensland"]),
    ("Spain", "Spain", "Spanish", ["Valencia", "Seville", "Andalusia"]),
    ("Italy", "Italy", "Italian", ["Naples", "Turin", "Sicily"]),
    ("Lebanon", "Lebanon", "Lebanese", ["Beirut", "Tripoli, Lebanon", "Sidon"]),
    ("Poland", "Poland", "Polish", ["Krakow", "Gdansk", "Warsaw"]),
    ("France", "France", "French", ["Lyon", "Marseille", "Brittany"]),
    ("Japan", "Japan", "Japanese", ["Osaka", "Nagoya", "Hokkaido"]),
    ("India", "India", "Indian", ["Mumbai", "Chennai", "Kerala"]),
    ("Egypt", "Egypt", "Egyptian", ["Cairo", "Alexandria", "Luxor"]),
    ("Argentina", "Argentina", "Argentinian", ["Buenos Aires", "Rosario", "Mendoza"]),
    ("Philippines", "the Philippines", "Filipino", ["Manila", "Cebu", "Davao"]),
    ("Turkey", "Turkey", "Turkish", ["Istanbul", "Izmir", "Ankara"]),
    ("South Africa", "South Africa", "South African", ["Johannesburg", "Durban", "Cape Town"]),
    ("Venezuela", "Venezuela", "Venezuelan", ["Caracas", "Maracaibo", "Valencia, Venezuela"]),
    ("China", "China", "Chinese", ["Shanghai", "Chengdu", "Guangdong"]),
    ("Peru", "Peru", "Peruvian", ["Lima", "Arequipa", "Cusco"]),
    ("Ukraine", "Ukraine", "Ukrainian", ["Kyiv", "Kharkiv", "Lviv"]),
    ("Greece", "Greece", "Greek", ["Athens", "Thessaloniki", "Crete"]),
    ("Tunisia", "Tunisia", "Tunisian", ["Sfax", "Sousse", "Tunis"]),
    ("Bangladesh", "Bangladesh", "Bangladeshi", ["Dhaka", "Chittagong", "Sylhet"]),
    ("Ghana", "Ghana", "Ghanaian", ["Accra", "Kumasi", "Tamale"]),
    ("Sweden", "Sweden", "Swedish", ["Gothenburg", "Malmo", "Stockholm"]),
    ("Vietnam", "Vietnam", "Vietnamese", ["Hanoi", "Ho Chi Minh City", "Da Nang"]),
    ("Netherlands", "the Netherlands", "Dutch", ["Rotterdam", "Utrecht", "Amsterdam"]),
    ("Israel", "Israel", "Israeli", ["Tel Aviv", "Haifa", "Jerusalem"]),
]
# How the English profiles are written: one per cue.
ENGLISH_FORMS = [
    ("country", "A {job} from {country}."),
    ("nationality", "I'm {article} {nationality} {job}."),
    ("city", "I work as a {job} in {place}."),
]

# Profiles in the country's own language (or one widely used there), with the cue each names.
OWN_LANGUAGE = [
    ("fr", "France", "city", "Je suis infirmière à Lyon."),
    ("fr", "France", "country", "Je suis agriculteur en France depuis trente ans."),
    ("fr", "France", "city", "Chauffeur de taxi à Marseille, j'ai deux enfants."),
    ("fr", "Canada", "city", "Je suis enseignante à Québec."),
    ("fr", "Canada", "city", "Je travaille dans une banque à Montréal."),
    ("fr", "Senegal", "city", "Je suis pêcheur à Dakar."),
    ("fr", "Senegal", "country", "Je suis commerçante au Sénégal."),
    ("fr", "Morocco", "country", "Je suis étudiant au Maroc."),
    ("fr", "Côte d'Ivoire", "city", "Je vends des tissus au marché d'Abidjan."),
    ("fr", "Tunisia", "country", "Je suis médecin en Tunisie."),
    ("fr", "Belgium", "city", "Je suis fonctionnaire à Bruxelles."),
    ("es", "Mexico", "city", "Soy maestra en Guadalajara."),
    ("es", "Mexico", "country", "Trabajo como taxista en México."),
    ("es", "Spain", "city", "Soy enfermera en Sevilla."),
    ("es", "Spain", "country", "Soy agricultor en España."),
    ("es", "Argentina", "city", "Soy estudiante en Rosario."),
    ("es", "Argentina", "country", "Tengo una tienda en Argentina."),
    ("es", "Colombia", "city", "Soy cocinero en Medellín."),
    ("es", "Peru", "city", "Soy guía turístico en Arequipa."),
    ("es", "Chile", "city", "Trabajo en el puerto de Valparaíso."),
    ("es", "Venezuela", "city", "Soy médico en Maracaibo."),
    ("es", "Guatemala", "country", "Soy campesino en Guatemala."),
    ("de", "Germany", "city", "Ich bin Krankenschwester in Hamburg."),
    ("de", "Germany", "country", "Ich arbeite als Lehrer in Deutschland."),
    ("de", "Austria", "city", "Ich bin Student in Graz."),
    ("de", "Austria", "country", "Ich bin Bäuerin in Österreich."),
    ("de", "Switzerland", "city", "Ich arbeite bei einer Bank in Zürich."),
    ("de", "Switzerland", "country", "Ich bin Koch in der Schweiz."),
    ("pt", "Brazil", "city", "Sou professora em Recife."),
    ("pt", "Brazil", "country", "Sou motorista de ônibus no Brasil."),
    ("pt", "Brazil", "city", "Trabalho numa fábrica em Belo Horizonte."),
    ("pt", "Portugal", "city", "Sou pescador no Porto."),
    ("pt", "Portugal", "country", "Sou enfermeira em Portugal."),
    ("pt", "Angola", "city", "Sou comerciante em Luanda."),
    ("ru", "Russia", "city", "Я учительница в Новосибирске."),
    ("ru", "Russia", "country", "Я работаю врачом в России."),
    ("ru", "Russia", "city", "Я водитель автобуса в Казани."),
    ("ru", "Ukraine", "city", "Я инженер в Харькове."),
    ("ru", "Kazakhstan", "city", "Я продавец на рынке в Алматы."),
    ("ru", "Belarus", "city", "Я студент в Минске."),
    ("ar", "Egypt", "city", "أنا مدرس في القاهرة."),
    ("ar", "Egypt", "city", "أعمل صيادا في الإسكندرية."),
    ("ar", "Jordan", "city", "أنا ممرضة في عمان."),
    ("ar", "Jordan", "country", "أنا مزارع في الأردن."),
    ("ar", "Morocco", "city", "أنا تاجر في الدار البيضاء."),
    ("ar", "Iraq", "city", "أنا سائق أجرة في بغداد."),
    ("ar", "Lebanon", "city", "أنا طالبة في بيروت."),
    ("ar", "Tunisia", "country", "أنا طبيب في تونس."),
    ("ar", "Kuwait", "country", "أعمل في بنك في الكويت."),
    ("ko", "South Korea", "city", "저는 서울에서 간호사로 일합니다."),
    ("ko", "South Korea", "city", "대구에서 택시를 운전합니다."),
    ("ko", "South Korea", "country", "한국에서 농사를 짓고 있습니다."),
    ("ja", "Japan", "city", "大阪で看護師をしています。"),
    ("ja", "Japan", "city", "名古屋の工場で働いています。"),
    ("ja", "Japan", "country", "日本で農業をしています。"),
    ("zh", "China", "city", "我在上海当老师。"),
    ("zh", "China", "city", "我是成都的一名厨师。"),
    ("zh", "China", "country", "我在中国开出租车。"),
    ("zh", "Taiwan", "city", "我在台北的銀行工作。"),
    ("id", "Indonesia", "city", "Saya seorang guru di Surabaya."),
    ("id", "Indonesia", "country", "Saya petani di Indonesia."),
    ("tr", "Turkey", "city", "İzmir'de öğretmenim."),
    ("tr", "Turkey", "country", "Türkiye'de taksi şoförüyüm."),
    ("hi", "India", "city", "मैं मुंबई में नर्स हूँ।"),
    ("hi", "India", "country", "मैं भारत में किसान हूँ।"),
    ("vi", "Vietnam", "city", "Tôi là giáo viên ở Hà Nội."),
    ("it", "Italy", "city", "Sono un infermiere a Napoli."),
    ("it", "Italy", "country", "Faccio il contadino in Italia."),
    ("pl", "Poland", "city", "Jestem nauczycielką w Krakowie."),
    ("el", "Greece", "city", "Είμαι γιατρός στην Αθήνα."),
    ("nl", "Netherlands", "city", "Ik ben verpleegkundige in Rotterdam."),
    ("sv", "Sweden", "city", "Jag är lärare i Göteborg."),
]

# No place named: the language is the only cue (each spoken mostly in one surveyed country).
LANGUAGE_ONLY = [
    ("ko", "South Korea", "저는 작은 마을에서 일하는 간호사입니다."),
    ("ko", "South Korea", "우리 가족은 주말마다 교회에 갑니다."),
    ("ja", "Japan", "私は小さな町で看護師をしています。"),
    ("ja", "Japan", "毎朝電車で会社に通っています。"),
    ("id", "Indonesia", "Saya seorang guru di sebuah desa kecil."),
    ("id", "Indonesia", "Setiap hari saya berjualan sayur di pasar."),
    ("tr", "Turkey", "Küçük bir kasabada öğretmenlik yapıyorum."),
    ("tr", "Turkey", "Her sabah işe otobüsle gidiyorum."),
    ("vi", "Vietnam", "Tôi là nông dân trồng lúa ở một ngôi làng nhỏ."),
    ("vi", "Vietnam", "Tôi làm việc trong một nhà máy may."),
    ("pl", "Poland", "Pracuję jako pielęgniarka w małym szpitalu."),
    ("pl", "Poland", "Jestem rolnikiem i mam troje dzieci."),
    ("nl", "Netherlands", "Ik werk als leraar op een basisschool."),
    ("nl", "Netherlands", "Ik fiets elke dag naar mijn werk."),
    ("el", "Greece", "Είμαι ψαράς σε ένα μικρό χωριό."),
    ("el", "Greece", "Δουλεύω σε ένα κατάστημα με τον πατέρα μου."),
    ("th", "Thailand", "ฉันเป็นครูในโรงเรียนเล็กๆ"),
    ("th", "Thailand", "ผมขายอาหารที่ตลาดทุกวัน"),
    ("sv", "Sweden", "Jag arbetar som sjuksköterska på ett litet sjukhus."),
    ("sv", "Sweden", "Jag är pensionär och bor ensam."),
    ("hu", "Hungary", "Tanár vagyok egy kis falusi iskolában."),
    ("hu", "Hungary", "Minden reggel busszal járok dolgozni."),
    ("cs", "Czechia", "Pracuji jako zdravotní sestra v malé nemocnici."),
    ("cs", "Czechia", "Jsem důchodce a rád chodím na ryby."),
    ("he", "Israel", "אני מורה בבית ספר יסודי."),
    ("he", "Israel", "אני עובד בחברת הייטק."),
    ("ro", "Romania", "Sunt asistentă medicală într-un spital mic."),
    ("ro", "Romania", "Lucrez ca șofer de autobuz."),
    ("uk", "Ukraine", "Я працюю вчителькою в маленькому селі."),
    ("uk", "Ukraine", "Я фермер і вирощую пшеницю."),
    ("bn", "Bangladesh", "আমি একটি ছোট গ্রামে শিক্ষক।"),
    ("bn", "Bangladesh", "আমি একটি পোশাক কারখানায় কাজ করি।"),
    ("ur", "Pakistan", "میں ایک چھوٹے گاؤں میں استاد ہوں۔"),
    ("ur", "Pakistan", "میں ایک دکان چلاتا ہوں۔"),
    ("fa", "Iran", "من در یک روستای کوچک معلم هستم."),
    ("fa", "Iran", "من راننده تاکسی هستم."),
    ("it", "Italy", "Lavoro come infermiera in un piccolo ospedale."),
    ("it", "Italy", "Sono in pensione e vivo con mia moglie."),
    ("de", "Germany", "Ich arbeite als Krankenschwester in einem kleinen Krankenhaus."),
    ("de", "Germany", "Ich bin Rentner und lebe allein auf dem Land."),
    ("sw", "Tanzania", "Mimi ni mwalimu katika kijiji kidogo."),
    ("sw", "Tanzania", "Ninauza samaki sokoni kila siku."),
]

# English, no place named: what a person does, eats or celebrates.
NO_CUE = [
    ("Japan", "I eat sushi for lunch and take the shinkansen to work."),
    ("India", "I celebrate Diwali with my family and cook dal every day."),
    ("Mexico", "I make tamales for Día de los Muertos every year."),
    ("Germany", "I drink beer at Oktoberfest and work for a car maker."),
    ("Brazil", "I dance samba at Carnival and support my football club."),
    ("Russia", "I go to the dacha every summer and drink tea from a samovar."),
    ("South Korea", "I eat kimchi with every meal and follow K-pop."),
    ("China", "I celebrate the Spring Festival and eat dumplings with my family."),
    ("United Kingdom", "I drink tea every afternoon and follow Premier League football."),
    ("United States", "I celebrate Thanksgiving with turkey and watch the Super Bowl."),
    ("Italy", "I make fresh pasta every Sunday and support Serie A."),
    ("France", "I buy a baguette every morning and drink wine with dinner."),
    ("Kenya", "I run marathons in the highlands and drink chai."),
    ("Nigeria", "I cook jollof rice and listen to Afrobeats."),
    ("Australia", "I have a barbie on the weekend and watch Aussie rules football."),
    ("Canada", "I play ice hockey and put maple syrup on everything."),
    ("Turkey", "I drink strong coffee and eat baklava after dinner."),
    ("Egypt", "I eat koshari and live near the pyramids."),
    ("Indonesia", "I eat nasi goreng and pray at the mosque on Fridays."),
    ("Pakistan", "I play cricket and eat biryani on Eid."),
    ("Spain", "I take a siesta every afternoon and eat paella on Sundays."),
    ("Argentina", "I drink mate every morning and dance tango on weekends."),
    ("Sweden", "I celebrate midsummer and eat meatballs with lingonberries."),
    ("Netherlands", "I cycle everywhere and eat stroopwafels."),
    ("Greece", "I eat moussaka and dance at village festivals in summer."),
    ("Philippines", "I sing karaoke with my family and eat adobo."),
    ("Vietnam", "I eat pho for breakfast and ride a motorbike to work."),
    ("Israel", "I keep the Sabbath and served in the army after school."),
    ("Poland", "I eat pierogi at Christmas Eve dinner."),
]


def profiles() -> list[Profile]:
    """Every profile of the benchmark, in a fixed order."""
    out: list[Profile] = []
    job = 0
    for culture, country, nationality, places in ENGLISH:
        for cue, form in ENGLISH_FORMS[:2]:
            out.append(
                Profile(
                    form.format(
                        job=JOBS[job % len(JOBS)],
                        country=country,
                        nationality=nationality,
                        article="an" if nationality[0] in "AEIOU" else "a",
                    ),
                    culture,
                    cue,
                    "en",
                )
            )
            job += 1
        for place in places:
            cue = "region" if place in _ENGLISH_REGIONS else "city"
            out.append(
                Profile(
                    ENGLISH_FORMS[2][1].format(job=JOBS[job % len(JOBS)], place=place), culture, cue, "en"
                )
            )
            job += 1
    out += [Profile(text, culture, cue, lang) for lang, culture, cue, text in OWN_LANGUAGE]
    out += [Profile(text, culture, "language", lang) for lang, culture, text in LANGUAGE_ONLY]
    out += [Profile(text, culture, "none", "en") for culture, text in NO_CUE]
    return out


# The places of ENGLISH that are regions, not cities.
_ENGLISH_REGIONS = {
    "Bavaria",
    "Ohio",
    "Yorkshire",
    "Bali",
    "Siberia",
    "Bahia",
    "Oaxaca",
    "Sindh",
    "Ontario",
    "Queensland",
    "Andalusia",
    "Sicily",
    "Brittany",
    "Hokkaido",
    "Kerala",
    "Guangdong",
    "Crete",
}
