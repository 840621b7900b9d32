"""Running the task in Flower's Simulation Runtime (``simulation``) and comparing PoI
with Flower's robust strategies over seeds and attacks (``compare``)."""
