def main() -> None:
    print("tessera")
