from services.campaigns.main import main
from services.runtime.lifecycle import run

run(main)
