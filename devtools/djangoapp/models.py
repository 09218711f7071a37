from django.db import models


class Counter(models.Model):
    name = models.CharField(max_length=50, unique=True)
    value = models.IntegerField(default=0)

    class Meta:
        app_label = "djangoapp"


class Event(models.Model):
    at = models.DateTimeField()
    payload = models.JSONField(default=dict)

    class Meta:
        app_label = "djangoapp"
