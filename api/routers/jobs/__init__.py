"""`/v1/jobs`: one router made of the job routes' modules, in the order clients see them.

A job of another organisation answers 404, exactly like a job that does not exist.
"""

from fastapi import APIRouter

from api.routers.jobs import actions, insight, read, submit

router = APIRouter()
# The order of inclusion is the order of the OpenAPI document's paths and of route matching.
for module in (submit, read, actions, insight):
    router.include_router(module.router)
