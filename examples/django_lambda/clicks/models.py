from django.db import models


class Tally(models.Model):
    """Clicks counted per name."""

    name = models.CharField(max_length=100, unique=True)
    clicks = models.BigIntegerField(default=0)


class Click(models.Model):
    """One recorded click: the Lambda request (or task) that made it."""

    tally = models.ForeignKey(Tally, on_delete=models.CASCADE)
    request_id = models.CharField(max_length=100)
    at = models.DateTimeField(auto_now_add=True)
