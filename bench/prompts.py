"""The prompts every contender gets, in the same order.

Plain text (Gemma 3 270M is a base model without a chat template), 33-47 tokens each, each starting
differently so no contender can reuse the previous prompt's cache (llama-cpp-python keeps the longest common
prefix) and every request pays a real prefill. Chosen so that greedy decoding runs to 128 tokens on both
SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M (checked with llama-cpp-python 0.3.36): a reply cut short
by an end-of-text token would make its tokens/s a measure of a dozen tokens.
"""

from __future__ import annotations

PROMPTS: list[str] = [
    "The history of the Raspberry Pi began in 2006, when a group of lecturers at the University of Cambridge "
    "noticed that fewer students arrived with any experience of programming. They wanted a cheap computer that",
    "Greenhouse log, day 41. The tomato seedlings on the south bench are growing faster than the ones by the "
    "door. Over the past week the head gardener has been writing down everything she changed, starting with",
    "In a small workshop at the edge of town, an old clockmaker kept a drawer full of gears that no longer fit "
    "any clock he owned. One winter evening his granddaughter opened the drawer and asked",
    "The first chapter of the manual explains how the kitchen robot was designed. It begins in a small apartment "
    "in Lisbon, where an engineer who hated washing dishes spent three winters building",
    "Maintenance report for pump station 7: vibration on the second motor rose from 2.1 to 4.8 millimetres per "
    "second over three days, while the flow rate stayed constant. The technician on duty concluded that",
    "Solar panels on a narrowboat produce most of their energy around midday, but the fridge and the water pump "
    "run all day. This is the story of one owner's first summer on the canals, which began when",
    "A lighthouse keeper's diary, 14 March: the fog came in before noon and has not lifted. The supply boat is "
    "two days late and the radio only gives static. Tonight I will",
    "Breakfast questions to a voice assistant are mostly about the weather, the traffic and the day's "
    "appointments. Here is a transcript of a long conversation between a tired parent and the assistant, which "
    "began with",
    "Chapter one. The train to the northern coast left the city at dawn, and the only other passenger in the "
    "carriage was an old woman carrying a cage with a grey parrot in it. She looked at me and said",
    "In the spring of 1998, a small company in Helsinki began selling a weather station that could be read from "
    "any computer in the house. Its founders had met at university, where",
    "Every autumn the village holds a competition for the largest pumpkin. This year the favourite was a retired "
    "teacher who had spent months preparing the soil, and on the morning of the weigh-in",
]
