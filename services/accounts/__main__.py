from services.accounts.main import main
from services.runtime.lifecycle import run

run(main)
